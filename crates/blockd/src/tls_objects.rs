//! The TLS and authorization objects (QEMU's `crypto/tlscredsx509.c`,
//! `crypto/tlscreds.c`, `authz/simple.c`, `authz/list.c`):
//! `tls-creds-x509`, `authz-simple` and `authz-list`, as `object-add` and
//! `--object` make them and `qom-get`/`qom-set` see them.
//!
//! Credentials are loaded when the object is completed; changing their
//! properties later changes what `qom-get` reports, not what is loaded
//! (as in QEMU, which reloads only on request). An encrypted private key
//! is read then, with the UTF-8 text of the secret `passwordid` names
//! (QEMU's `qcrypto_secret_lookup_as_utf8`, looked up only when there is
//! a key to read); deleting the secret later changes nothing. An
//! authorization object is looked up by id at every client's check, so
//! changes apply to the next client. Deleting either while a server or node uses it is
//! allowed, as in QEMU (qemu-storage-daemon 10.0.2, recorded): the user
//! keeps its reference, a deleted `tls-authz` refuses later clients.
//!
//! `tls-creds-psk` is not offered: rustls has no pre-shared-key cipher
//! suites (RFC 4279) for GnuTLS's PSK key exchange to talk to, and no
//! maintained Rust TLS library speaks them interoperably.

use std::sync::{Arc, Mutex};

use blockd_nbd::tls::{Authz, Endpoint, TlsRegistry, X509Creds, X509Options};
use serde_json::{Map, Value};

/// A `tls-creds-x509` object: its properties and what was loaded.
pub struct TlsCredsX509 {
    opts: X509Options,
    priority: Option<String>,
    passwordid: Option<String>,
    /// The loaded credentials.
    pub creds: Arc<X509Creds>,
}

fn string(args: &Map<String, Value>, k: &str) -> Option<String> {
    args.get(k).and_then(Value::as_str).map(str::to_string)
}

impl TlsCredsX509 {
    /// `object-add` of a `tls-creds-x509` (arguments checked against the
    /// schema already): loads the files (`qcrypto_tls_creds_x509_load`).
    /// `secret` finds the secret `passwordid` names (QEMU's
    /// `qcrypto_secret_lookup`, with its errors); its value is the
    /// password of an encrypted key, looked up only when a key is read.
    pub fn create(
        args: &Map<String, Value>,
        secret: impl FnOnce(&str) -> Result<Arc<crate::secret::Secret>, String>,
    ) -> Result<TlsCredsX509, String> {
        let opts = X509Options {
            dir: string(args, "dir"),
            endpoint: match args.get("endpoint").and_then(Value::as_str) {
                Some("server") => Endpoint::Server,
                _ => Endpoint::Client,
            },
            verify_peer: args
                .get("verify-peer")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            sanity_check: args
                .get("sanity-check")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        };
        let passwordid = string(args, "passwordid");
        // qcrypto_secret_lookup_as_utf8
        let password = || match &passwordid {
            Some(id) => secret(id).and_then(|s| s.utf8(id)).map(Some),
            None => Ok(None),
        };
        let creds = Arc::new(X509Creds::load(&opts, password)?);
        Ok(TlsCredsX509 {
            opts,
            priority: string(args, "priority"),
            passwordid,
            creds,
        })
    }

    /// `qom-get`.
    pub fn get(&self, prop: &str) -> Option<Value> {
        Some(match prop {
            "endpoint" => self.opts.endpoint.as_str().into(),
            "dir" => self.opts.dir.clone().unwrap_or_default().into(),
            "verify-peer" => self.opts.verify_peer.into(),
            "priority" => self.priority.clone().unwrap_or_default().into(),
            "sanity-check" => self.opts.sanity_check.into(),
            "passwordid" => self.passwordid.clone().unwrap_or_default().into(),
            _ => return None,
        })
    }

    /// `qom-set`: QEMU's setters store the value (nothing is reloaded).
    pub fn set(&mut self, prop: &str, v: &Value) -> Result<(), String> {
        let want_str = || {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("Invalid parameter type for '{prop}', expected: string"))
        };
        let want_bool = || {
            v.as_bool()
                .ok_or_else(|| format!("Invalid parameter type for '{prop}', expected: boolean"))
        };
        match prop {
            "dir" => self.opts.dir = Some(want_str()?),
            "priority" => self.priority = Some(want_str()?),
            "passwordid" => self.passwordid = Some(want_str()?),
            "verify-peer" => self.opts.verify_peer = want_bool()?,
            "sanity-check" => self.opts.sanity_check = want_bool()?,
            "endpoint" => {
                let s = want_str()?;
                self.opts.endpoint = match s.as_str() {
                    "client" => Endpoint::Client,
                    "server" => Endpoint::Server,
                    _ => return Err(format!("Parameter 'endpoint' does not accept value '{s}'")),
                };
            }
            "type" => return Err("Property 'tls-creds-x509.type' is not writable".into()),
            _ => return Err(format!("Property 'tls-creds-x509.{prop}' not found")),
        }
        Ok(())
    }
}

/// One rule of an `authz-list` (QAPI `QAuthZListRule`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    matches: String,
    allow: bool,
    glob: bool,
}

/// What an authorization object decides by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthzRules {
    /// `authz-simple`: exactly this identity.
    Simple(String),
    /// `authz-list`: the first matching rule's policy, else the default.
    List {
        /// The default policy (allow?).
        allow: bool,
        /// The rules, in order.
        rules: Vec<Rule>,
    },
}

/// An `authz-simple` or `authz-list` object.
pub struct AuthzObject {
    rules: Mutex<AuthzRules>,
}

fn policy(allow: bool) -> &'static str {
    if allow {
        "allow"
    } else {
        "deny"
    }
}

/// GLib's `g_pattern_match_simple`: `*` is any run, `?` any one character.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn parse_rules(v: &Value) -> Result<Vec<Rule>, String> {
    let Some(list) = v.as_array() else {
        return Err("Invalid parameter type for 'rules', expected: array".into());
    };
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let get = |k: &str| r.get(k).and_then(Value::as_str);
            let Some(m) = get("match") else {
                return Err(format!("Parameter 'rules[{i}].match' is missing"));
            };
            let allow = match get("policy") {
                Some("allow") => true,
                Some("deny") => false,
                Some(o) => return Err(format!("Parameter 'policy' does not accept value '{o}'")),
                None => return Err(format!("Parameter 'rules[{i}].policy' is missing")),
            };
            let glob = match get("format") {
                Some("glob") => true,
                Some("exact") | None => false,
                Some(o) => return Err(format!("Parameter 'format' does not accept value '{o}'")),
            };
            Ok(Rule {
                matches: m.to_string(),
                allow,
                glob,
            })
        })
        .collect()
}

fn parse_policy(v: &Value) -> Result<bool, String> {
    match v.as_str() {
        Some("allow") => Ok(true),
        Some("deny") => Ok(false),
        Some(o) => Err(format!("Parameter 'policy' does not accept value '{o}'")),
        None => Err("Invalid parameter type for 'policy', expected: string".into()),
    }
}

impl AuthzObject {
    /// `object-add` of an `authz-simple` or `authz-list`.
    pub fn create(ty: &str, args: &Map<String, Value>) -> Result<AuthzObject, String> {
        let rules = if ty == "authz-simple" {
            let Some(id) = string(args, "identity") else {
                return Err("Parameter 'identity' is missing".into());
            };
            AuthzRules::Simple(id)
        } else {
            AuthzRules::List {
                allow: match args.get("policy") {
                    Some(p) => parse_policy(p)?,
                    None => false,
                },
                rules: match args.get("rules") {
                    Some(r) => parse_rules(r)?,
                    None => Vec::new(),
                },
            }
        };
        Ok(AuthzObject {
            rules: Mutex::new(rules),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthzRules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The QOM type name.
    pub fn type_name(&self) -> &'static str {
        match *self.lock() {
            AuthzRules::Simple(_) => "authz-simple",
            AuthzRules::List { .. } => "authz-list",
        }
    }

    /// `qom-get`.
    pub fn get(&self, prop: &str) -> Option<Value> {
        match (&*self.lock(), prop) {
            (AuthzRules::Simple(id), "identity") => Some(id.clone().into()),
            (AuthzRules::List { allow, .. }, "policy") => Some(policy(*allow).into()),
            (AuthzRules::List { rules, .. }, "rules") => Some(Value::Array(
                rules
                    .iter()
                    .map(|r| {
                        // QEMU's output visitor: a default format is left out.
                        let mut m = Map::new();
                        if r.glob {
                            m.insert("format".into(), "glob".into());
                        }
                        m.insert("policy".into(), policy(r.allow).into());
                        m.insert("match".into(), r.matches.clone().into());
                        Value::Object(m)
                    })
                    .collect(),
            )),
            _ => None,
        }
    }

    /// `qom-set`.
    pub fn set(&self, prop: &str, v: &Value) -> Result<(), String> {
        let ty = self.type_name();
        let mut g = self.lock();
        match (&mut *g, prop) {
            (AuthzRules::Simple(id), "identity") => {
                *id = v.as_str().map(str::to_string).ok_or_else(|| {
                    "Invalid parameter type for 'identity', expected: string".to_string()
                })?;
            }
            (AuthzRules::List { allow, .. }, "policy") => *allow = parse_policy(v)?,
            (AuthzRules::List { rules, .. }, "rules") => *rules = parse_rules(v)?,
            (_, "type") => return Err(format!("Property '{ty}.type' is not writable")),
            _ => return Err(format!("Property '{ty}.{prop}' not found")),
        }
        Ok(())
    }
}

impl Authz for AuthzObject {
    fn is_allowed(&self, identity: &str) -> Result<bool, String> {
        Ok(match &*self.lock() {
            AuthzRules::Simple(id) => id == identity,
            AuthzRules::List { allow, rules } => rules
                .iter()
                .find(|r| {
                    if r.glob {
                        glob(&r.matches, identity)
                    } else {
                        r.matches == identity
                    }
                })
                .map_or(*allow, |r| r.allow),
        })
    }
}

/// Registers a new authorization object under `id`.
pub fn register_authz(reg: &TlsRegistry, id: &str, a: &Arc<AuthzObject>) {
    reg.add_authz(id, a.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_as_glib() {
        assert!(glob("CN=*", "CN=client one"));
        assert!(glob("*,CN=client ?ne", "C=GB,CN=client one"));
        assert!(!glob("CN=*", "C=GB,CN=x"));
        assert!(glob("*", ""));
        assert!(!glob("?", ""));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
    }

    #[test]
    fn lists_decide_by_the_first_match() {
        let a = AuthzObject::create(
            "authz-list",
            json!({"policy": "allow", "rules": [
                {"match": "CN=bad*", "policy": "deny", "format": "glob"},
                {"match": "CN=good", "policy": "allow"}]})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        assert!(!a.is_allowed("CN=badly").unwrap());
        assert!(a.is_allowed("CN=good").unwrap());
        assert!(a.is_allowed("CN=other").unwrap());
        a.set("policy", &json!("deny")).unwrap();
        assert!(!a.is_allowed("CN=other").unwrap());
        assert_eq!(
            a.get("rules").unwrap(),
            json!([{"format": "glob", "policy": "deny", "match": "CN=bad*"},
                   {"policy": "allow", "match": "CN=good"}])
        );
        assert_eq!(
            a.set("rules", &json!([{"match": "x"}])).unwrap_err(),
            "Parameter 'rules[0].policy' is missing"
        );
    }

    #[test]
    fn simple_is_one_identity() {
        let a = AuthzObject::create(
            "authz-simple",
            json!({"identity": "CN=a"}).as_object().unwrap(),
        )
        .unwrap();
        assert!(a.is_allowed("CN=a").unwrap());
        assert!(!a.is_allowed("CN=a,O=x").unwrap());
        assert_eq!(
            AuthzObject::create("authz-simple", &Map::new())
                .err()
                .unwrap(),
            "Parameter 'identity' is missing"
        );
    }
}
