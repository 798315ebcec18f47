//! The NBD export server of blockd: fixed newstyle handshake, structured
//! replies, block status, many clients with requests in flight.
//!
//! (The server arrives with the NBD issue; this crate holds the place in
//! the workspace so the dependency structure is fixed from the start.)
