//! Secrets a driver needs (QEMU's `qcrypto_secret_lookup`): the server
//! keeps them (`secret` objects); drivers look them up by id. A secret's
//! value is never logged or put into a message.

/// Looks secrets up by object id.
pub trait Secrets: Send + Sync {
    /// The secret `id`'s value in base64 (`qcrypto_secret_lookup_as_base64`);
    /// errors are QEMU's ("No secret with id 'x'", ...).
    fn lookup_base64(&self, id: &str) -> Result<String, String>;

    /// The secret `id`'s value as bytes (`qcrypto_secret_lookup`: a
    /// passphrase), in a buffer that is wiped when dropped; errors as
    /// [`Secrets::lookup_base64`]'s.
    fn lookup(&self, id: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String>;
}
