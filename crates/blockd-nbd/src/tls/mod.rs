//! TLS for NBD, both ways (QEMU's `crypto/tlscredsx509.c`,
//! `crypto/tlssession.c`, and the STARTTLS steps of `nbd/server.c` and
//! `nbd/client.c`), over rustls with the ring provider.
//!
//! * [`X509Creds`]: a loaded `tls-creds-x509` object: the CA list, the
//!   optional CRL, this side's certificate and key, and the rustls
//!   configuration built from them ([`load`], with QEMU's file names,
//!   sanity checks and messages); the private key may be encrypted
//!   ([`key`]: PKCS#8 PBES2, with the password of `passwordid`'s secret).
//! * [`TlsRegistry`]: the credentials and authorization objects of a
//!   server by id, filled by the QMP layer and read by the NBD server and
//!   the `nbd` driver (as the throttle groups are).
//! * Peer checks ([`verify`]) run after the TLS handshake, as GnuTLS
//!   sessions do in QEMU (`qcrypto_tls_session_check_credentials`): the
//!   handshake itself only proves that the peer holds its certificate's
//!   key, then the chain, the host name (client side) and the
//!   authorization (server side) are checked with QEMU's messages, and a
//!   refused peer is dropped without a word.
//! * [`TlsIo`]: the stream wrapper that words I/O errors as QEMU's
//!   `QIOChannelTLS` does.
//!
//! `tls-creds-psk` is not offered: rustls has no TLS-PSK cipher suites
//! (RFC 4279) that GnuTLS's `PSK` key exchange could talk to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub mod dn;
mod io;
pub mod key;
pub mod load;
pub mod verify;

pub use io::TlsIo;
pub use load::{X509Creds, X509Options};

/// Which side of a TLS session credentials are for (QAPI
/// `QCryptoTLSCredsEndpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The connecting side.
    Client,
    /// The accepting side.
    Server,
}

impl Endpoint {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        }
    }
}

/// An authorization object (QEMU's `QAuthZ`): whether an identity (a
/// client certificate's distinguished name) may connect.
pub trait Authz: Send + Sync {
    /// `Ok(true)`: allowed; `Ok(false)`: denied; `Err`: the check failed.
    fn is_allowed(&self, identity: &str) -> Result<bool, String>;
}

/// Credentials and authorization objects by id.
#[derive(Default)]
pub struct TlsRegistry {
    creds: Mutex<HashMap<String, Arc<X509Creds>>>,
    authz: Mutex<HashMap<String, Arc<dyn Authz>>>,
    /// The ids of every other object, for QEMU's "not TLS credentials".
    others: Mutex<std::collections::HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TlsRegistry {
    /// A new, empty registry.
    pub fn new() -> Arc<TlsRegistry> {
        Arc::new(TlsRegistry::default())
    }

    /// The credentials called `id`.
    pub fn creds(&self, id: &str) -> Option<Arc<X509Creds>> {
        lock(&self.creds).get(id).cloned()
    }

    /// QEMU's `nbd_get_tls_creds` lookup: the credentials called `id`,
    /// or QEMU's message for an id that names nothing or something else.
    pub fn lookup_creds(&self, id: &str) -> Result<Arc<X509Creds>, String> {
        if let Some(c) = self.creds(id) {
            return Ok(c);
        }
        if lock(&self.authz).contains_key(id) || lock(&self.others).contains(id) {
            Err(format!("Object with id '{id}' is not TLS credentials"))
        } else {
            Err(format!("No TLS credentials with id '{id}'"))
        }
    }

    /// Notes an object of another kind (so that its id is known).
    pub fn note_other(&self, id: &str) {
        lock(&self.others).insert(id.to_string());
    }

    /// Registers credentials (replacing any of the same id).
    pub fn add_creds(&self, id: &str, c: Arc<X509Creds>) {
        lock(&self.creds).insert(id.to_string(), c);
    }

    /// Registers an authorization object.
    pub fn add_authz(&self, id: &str, a: Arc<dyn Authz>) {
        lock(&self.authz).insert(id.to_string(), a);
    }

    /// Forgets the object called `id`, whatever it is. Sessions that use
    /// it keep their own reference (QEMU's object references).
    pub fn remove(&self, id: &str) {
        lock(&self.creds).remove(id);
        lock(&self.authz).remove(id);
        lock(&self.others).remove(id);
    }

    /// QEMU's `qauthz_is_allowed_by_id`: the object is looked up at every
    /// check, so a changed or deleted object applies to the next client.
    pub fn is_allowed_by_id(&self, id: &str, identity: &str) -> Result<bool, String> {
        let a = lock(&self.authz).get(id).cloned();
        match a {
            Some(a) => a.is_allowed(identity),
            None => Err(format!("Cannot find QAuthZ object ID {id}")),
        }
    }
}

/// What a TLS-enabled NBD server needs.
#[derive(Clone)]
pub struct ServerTls {
    /// Server-endpoint credentials.
    pub creds: Arc<X509Creds>,
    /// The `tls-authz` object id, and where to find it.
    pub authz: Option<(String, Arc<TlsRegistry>)>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("authz", &self.authz.as_ref().map(|a| &a.0))
            .finish_non_exhaustive()
    }
}

/// What an NBD client needs for TLS.
#[derive(Clone)]
pub struct ClientTls {
    /// Client-endpoint credentials.
    pub creds: Arc<X509Creds>,
    /// The name the server's certificate must carry (`None`: no name to
    /// check, which fails when the peer is verified).
    pub hostname: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}
