//! User-creatable objects (QEMU's `qom/object_interfaces.c`, the
//! `/objects` container): `throttle-group` (`block/throttle-groups.c`)
//! and `iothread` (`iothread.c`), the TLS and authorization objects
//! ([`crate::tls_objects`]), created with `object-add` or `--object`
//! and removed with `object-del`.
//!
//! An `iothread` object is accepted and keeps its properties, as QEMU
//! scripts use them: blockd's executor is already multi-threaded, so an
//! export or node that names one runs as any other.
//!
//! The `/objects` container remembers the history of its children in a
//! [`HashOrder`], so that `qom-list` lists them in QEMU's order; an
//! object whose completion fails was briefly a child there, as in QEMU's
//! `user_creatable_add_type`.
//!
//! Errors are QEMU's messages (strings); the handlers choose the class.

use std::sync::{Arc, Mutex, MutexGuard};

use blockd_core::throttle::{BucketType, ThrottleConfig, ThrottleGroup, ThrottleGroups};
use serde_json::{Map, Value};

use crate::qom::ghash::HashOrder;

/// The `x-` properties of a throttle group, in QEMU's schema order: name,
/// bucket (None: `iops-size`), and which value.
const X_PROPS: [(&str, Option<BucketType>, Field); 19] = {
    use BucketType::*;
    use Field::*;
    [
        ("iops-total", Some(OpsTotal), Avg),
        ("iops-total-max", Some(OpsTotal), Max),
        ("iops-total-max-length", Some(OpsTotal), Len),
        ("iops-read", Some(OpsRead), Avg),
        ("iops-read-max", Some(OpsRead), Max),
        ("iops-read-max-length", Some(OpsRead), Len),
        ("iops-write", Some(OpsWrite), Avg),
        ("iops-write-max", Some(OpsWrite), Max),
        ("iops-write-max-length", Some(OpsWrite), Len),
        ("bps-total", Some(BpsTotal), Avg),
        ("bps-total-max", Some(BpsTotal), Max),
        ("bps-total-max-length", Some(BpsTotal), Len),
        ("bps-read", Some(BpsRead), Avg),
        ("bps-read-max", Some(BpsRead), Max),
        ("bps-read-max-length", Some(BpsRead), Len),
        ("bps-write", Some(BpsWrite), Avg),
        ("bps-write-max", Some(BpsWrite), Max),
        ("bps-write-max-length", Some(BpsWrite), Len),
        ("iops-size", None, Size),
    ]
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Avg,
    Max,
    Len,
    Size,
}

fn field(c: &ThrottleConfig, b: Option<BucketType>, f: Field) -> u64 {
    match (b, f) {
        (Some(b), Field::Avg) => c.bucket(b).avg,
        (Some(b), Field::Max) => c.bucket(b).max,
        (Some(b), Field::Len) => c.bucket(b).burst_length,
        _ => c.op_size,
    }
}

fn set_field(c: &mut ThrottleConfig, b: Option<BucketType>, f: Field, v: u64) {
    match (b, f) {
        (Some(b), Field::Avg) => c.bucket_mut(b).avg = v,
        (Some(b), Field::Max) => c.bucket_mut(b).max = v,
        (Some(b), Field::Len) => c.bucket_mut(b).burst_length = v,
        _ => c.op_size = v,
    }
}

/// `ThrottleLimits` of a configuration (QEMU's `throttle_config_to_limits`):
/// every member, integers as QEMU prints them.
pub fn limits_value(c: &ThrottleConfig) -> Value {
    let mut m = Map::new();
    for (name, b, f) in X_PROPS {
        m.insert(name.into(), (field(c, b, f) as i64).into());
    }
    Value::Object(m)
}

/// Applies a `ThrottleLimits` object over `c` (QEMU's
/// `throttle_limits_to_config`, without the final validation).
fn apply_limits(c: &mut ThrottleConfig, limits: &Map<String, Value>) -> Result<(), String> {
    for (name, b, f) in X_PROPS {
        let Some(v) = limits.get(name).and_then(Value::as_i64) else {
            continue;
        };
        if f == Field::Len && v > i64::from(u32::MAX) {
            return Err(format!(
                "{name} value must be in the range [0, {}]",
                u32::MAX
            ));
        }
        // QEMU's burst length is 64-bit: -1 passes the range check and
        // becomes a length far too long for any burst rate.
        set_field(c, b, f, v as u64);
    }
    Ok(())
}

/// An `iothread`'s properties (QEMU's defaults, `iothread.c` and
/// `event-loop-base.c`).
#[derive(Debug, Clone)]
pub struct IoThread {
    props: [(&'static str, i64); 6],
    /// Completed: a change of the event loop's parameters checks the
    /// thread pool's bounds (`iothread_set_aio_context_params`).
    live: bool,
}

impl Default for IoThread {
    fn default() -> Self {
        IoThread {
            props: [
                ("poll-max-ns", 32768),
                ("poll-grow", 0),
                ("poll-shrink", 0),
                ("aio-max-batch", 0),
                ("thread-pool-min", 0),
                ("thread-pool-max", 64),
            ],
            live: false,
        }
    }
}

impl IoThread {
    /// Sets a property as QEMU's setters do (`event_loop_base_set_param`,
    /// `iothread_set_poll_param`): the value is stored before the pool's
    /// bounds are checked, so a refused value stays.
    fn set(&mut self, name: &str, v: &Value) -> Result<(), String> {
        let Some(slot) = self.props.iter_mut().find(|(n, _)| *n == name) else {
            return Err(match name {
                "type" => "Property 'iothread.type' is not writable".into(),
                _ => format!("Property 'iothread.{name}' not found"),
            });
        };
        let v = v
            .as_i64()
            .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: integer"))?;
        if v < 0 {
            return Err(format!("{name} value must be in range [0, {}]", i64::MAX));
        }
        slot.1 = v;
        let event_loop_param = !name.starts_with("poll-");
        if self.live && event_loop_param {
            self.check_pool()?;
        }
        Ok(())
    }

    /// `aio_context_set_thread_pool_params`' check.
    fn check_pool(&self) -> Result<(), String> {
        let min = self.get("thread-pool-min").unwrap_or(0);
        let max = self.get("thread-pool-max").unwrap_or(0);
        let int_max = i64::from(i32::MAX);
        if min > max || max <= 0 || min > int_max || max > int_max {
            return Err("bad thread-pool-min/thread-pool-max values".into());
        }
        Ok(())
    }

    /// `iothread_init`: completion checks the pool's bounds.
    fn complete(&mut self) -> Result<(), String> {
        self.check_pool()?;
        self.live = true;
        Ok(())
    }

    /// A property's value.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.props.iter().find(|(n, _)| *n == name).map(|p| p.1)
    }
}

/// Reads a `ThrottleLimits` from a `qom-set` value as QEMU's input
/// visitor does: every member's type in schema order, then unexpected
/// members.
fn limits_arg(value: &Value) -> Result<&Map<String, Value>, String> {
    let Some(l) = value.as_object() else {
        return Err("Invalid parameter type for 'limits', expected: object".into());
    };
    for (name, _, _) in X_PROPS {
        if l.get(name).is_some_and(|v| v.as_i64().is_none()) {
            return Err(format!(
                "Invalid parameter type for 'limits.{name}', expected: integer"
            ));
        }
    }
    if let Some(k) = l.keys().find(|k| !X_PROPS.iter().any(|p| p.0 == *k)) {
        return Err(format!("Parameter 'limits.{k}' is unexpected"));
    }
    Ok(l)
}

/// What an object is.
pub enum ObjectKind {
    /// A `throttle-group`.
    ThrottleGroup(Arc<ThrottleGroup>),
    /// An `iothread`.
    IoThread(IoThread),
    /// A `tls-creds-x509` (see [`crate::tls_objects`]).
    TlsCredsX509(Box<crate::tls_objects::TlsCredsX509>),
    /// An `authz-simple` or `authz-list`.
    Authz(Arc<crate::tls_objects::AuthzObject>),
    /// A `secret` (see [`crate::secret`]).
    Secret(Arc<crate::secret::Secret>),
}

/// One object under `/objects`.
pub struct Object {
    /// Its id.
    pub id: String,
    /// What it is.
    pub kind: ObjectKind,
}

impl Object {
    /// The QOM type name.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            ObjectKind::ThrottleGroup(_) => "throttle-group",
            ObjectKind::IoThread(_) => "iothread",
            ObjectKind::TlsCredsX509(_) => "tls-creds-x509",
            ObjectKind::Authz(a) => a.type_name(),
            ObjectKind::Secret(_) => "secret",
        }
    }

    /// `qom-get`.
    pub fn get(&self, prop: &str) -> Result<Value, String> {
        if prop == "type" {
            return Ok(self.type_name().into());
        }
        let found = match &self.kind {
            ObjectKind::ThrottleGroup(g) => {
                let c = g.config();
                if prop == "limits" {
                    Some(limits_value(&c))
                } else {
                    prop.strip_prefix("x-")
                        .and_then(|n| X_PROPS.iter().find(|p| p.0 == n))
                        .map(|&(_, b, f)| (field(&c, b, f) as i64).into())
                }
            }
            ObjectKind::IoThread(t) => t.get(prop).map(Value::from),
            ObjectKind::TlsCredsX509(c) => c.get(prop),
            ObjectKind::Authz(a) => a.get(prop),
            ObjectKind::Secret(s) => {
                return s
                    .get(prop)
                    .unwrap_or_else(|| Err(format!("Property 'secret.{prop}' not found")))
            }
        };
        found.ok_or_else(|| format!("Property '{}.{prop}' not found", self.type_name()))
    }

    /// `qom-set`: a throttle group's `limits` (over its current ones; the
    /// `x-` properties only at creation), an iothread's parameters.
    pub fn set(&mut self, prop: &str, value: &Value) -> Result<(), String> {
        match &mut self.kind {
            ObjectKind::ThrottleGroup(g) => {
                if prop == "limits" {
                    let l = limits_arg(value)?;
                    let mut c = g.config();
                    apply_limits(&mut c, l)?;
                    c.validate()?;
                    g.set_config(c);
                    return Ok(());
                }
                let known = prop
                    .strip_prefix("x-")
                    .is_some_and(|n| X_PROPS.iter().any(|p| p.0 == n));
                if known {
                    Err("Property cannot be set after initialization".into())
                } else if prop == "type" {
                    Err("Property 'throttle-group.type' is not writable".into())
                } else {
                    Err(format!("Property 'throttle-group.{prop}' not found"))
                }
            }
            ObjectKind::IoThread(t) => t.set(prop, value),
            ObjectKind::TlsCredsX509(c) => c.set(prop, value),
            ObjectKind::Authz(a) => a.set(prop, value),
            // QEMU takes the value and keeps the loaded secret as it is.
            ObjectKind::Secret(_) => match prop {
                "data" | "file" | "format" | "keyid" | "iv" => Ok(()),
                "type" => Err("Property 'secret.type' is not writable".into()),
                _ => Err(format!("Property 'secret.{prop}' not found")),
            },
        }
    }
}

/// The objects of a server, in creation order.
#[derive(Default)]
pub struct Objects {
    list: Mutex<Vec<Object>>,
    /// `/objects`' property table, for the listing order.
    order: Mutex<HashOrder>,
    /// The TLS credentials and authorization objects, by id, for the NBD
    /// server and driver.
    tls: Arc<blockd_nbd::tls::TlsRegistry>,
    /// The `secret` objects' values, which drivers look up.
    pub secrets: Arc<crate::secret::SecretStore>,
}

/// Whether `id` is a well-formed QEMU identifier (`id_wellformed`).
fn id_wellformed(id: &str) -> bool {
    blockd_core::qapi::id_wellformed(id)
}

impl Objects {
    /// The objects (to read).
    pub fn lock(&self) -> MutexGuard<'_, Vec<Object>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The TLS credentials and authorization objects, by id.
    pub fn tls(&self) -> Arc<blockd_nbd::tls::TlsRegistry> {
        self.tls.clone()
    }

    fn order(&self) -> MutexGuard<'_, HashOrder> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ids and types of the objects, in `qom-list`'s order.
    pub fn listed(&self) -> Vec<(String, &'static str)> {
        let l = self.lock();
        self.order()
            .listed()
            .into_iter()
            .filter_map(|id| {
                l.iter()
                    .find(|o| o.id == id)
                    .map(|o| (o.id.clone(), o.type_name()))
            })
            .collect()
    }

    /// Runs `f` on the object called `id` (QEMU's "not found" names the
    /// path, which the caller knows).
    pub fn with<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Object) -> R,
    ) -> Result<R, crate::qom::QomError> {
        let mut l = self.lock();
        match l.iter_mut().find(|o| o.id == id) {
            Some(o) => Ok(f(o)),
            None => Err(crate::qom::QomError::NotFound(format!("/objects/{id}"))),
        }
    }

    /// A completion that failed: QEMU added the child, then removed it
    /// again (which leaves a tombstone in its table).
    fn failed_completion<T>(&self, id: &str, e: String) -> Result<T, String> {
        let mut o = self.order();
        o.insert(id);
        o.remove(id);
        Err(e)
    }

    /// `object-add` (QEMU's `user_creatable_add_type`): `args` holds
    /// `qom-type`, `id` and the properties, already checked against the
    /// schema. Properties first, then the id, then completion.
    pub fn add(&self, groups: &ThrottleGroups, args: &Map<String, Value>) -> Result<(), String> {
        let ty = args.get("qom-type").and_then(Value::as_str).unwrap_or("");
        let id = args.get("id").and_then(Value::as_str).unwrap_or("");
        if !id_wellformed(id) {
            return Err("Parameter 'id' expects an identifier".into());
        }
        let props = args.iter().filter(|(k, _)| *k != "qom-type" && *k != "id");
        let kind = match ty {
            "throttle-group" => {
                let mut c = ThrottleConfig::default();
                if let Some(Value::Object(l)) = args.get("limits") {
                    apply_limits(&mut c, l)?;
                    c.validate()?;
                }
                for (name, b, f) in X_PROPS {
                    let Some(v) = args.get(&format!("x-{name}")).and_then(Value::as_i64) else {
                        continue;
                    };
                    if v < 0 {
                        return Err("Property values cannot be negative".into());
                    }
                    if f == Field::Len && v > i64::from(u32::MAX) {
                        // (QEMU's message lacks the space.)
                        return Err(format!(
                            "x-{name} value must be in therange [0, {}]",
                            u32::MAX
                        ));
                    }
                    set_field(&mut c, b, f, v as u64);
                }
                self.check_id(id)?;
                // throttle_group_obj_complete
                let made = c.validate().and_then(|()| groups.create(id, c));
                match made {
                    Ok(g) => ObjectKind::ThrottleGroup(g),
                    Err(e) => return self.failed_completion(id, e),
                }
            }
            "secret" => {
                let props: Map<String, Value> =
                    props.map(|(k, v)| (k.clone(), v.clone())).collect();
                self.check_id(id)?;
                let s = match crate::secret::load(&props, |k| self.secret(id, k)) {
                    Ok(s) => Arc::new(s),
                    Err(e) => return self.failed_completion(id, e),
                };
                self.secrets.insert(id, s.clone());
                ObjectKind::Secret(s)
            }
            "iothread" => {
                let mut t = IoThread::default();
                for (k, v) in props {
                    t.set(k, v)?;
                }
                self.check_id(id)?;
                if let Err(e) = t.complete() {
                    return self.failed_completion(id, e);
                }
                ObjectKind::IoThread(t)
            }
            "tls-creds-x509" => {
                // (Unlike a secret's `keyid`, naming itself finds an
                // object that is not a secret.)
                let c = crate::tls_objects::TlsCredsX509::create(args, |k| {
                    if k == id {
                        return Err(crate::secret::lookup_error::not_a_secret(k));
                    }
                    self.secret(id, k)
                });
                self.check_id(id)?;
                match c {
                    Ok(c) => {
                        self.tls.add_creds(id, c.creds.clone());
                        ObjectKind::TlsCredsX509(Box::new(c))
                    }
                    Err(e) => return self.failed_completion(id, e),
                }
            }
            "authz-simple" | "authz-list" => {
                let a = Arc::new(crate::tls_objects::AuthzObject::create(ty, args)?);
                self.check_id(id)?;
                crate::tls_objects::register_authz(&self.tls, id, &a);
                ObjectKind::Authz(a)
            }
            other => {
                return Err(format!(
                    "Parameter 'qom-type' does not accept value '{other}'"
                ))
            }
        };
        let mut l = self.lock();
        if l.iter().any(|o| o.id == id) {
            return Err(duplicate(id));
        }
        if matches!(kind, ObjectKind::ThrottleGroup(_) | ObjectKind::IoThread(_)) {
            self.tls.note_other(id);
        }
        if !matches!(kind, ObjectKind::Secret(_)) {
            self.secrets.note_other(id);
        }
        l.push(Object {
            id: id.to_string(),
            kind,
        });
        self.order().insert(id);
        Ok(())
    }

    /// The secret `keyid` that the secret `adding` is encrypted with
    /// (QEMU's `qcrypto_secret_lookup`).
    fn secret(&self, adding: &str, keyid: &str) -> Result<Arc<crate::secret::Secret>, String> {
        if keyid == adding {
            return Err(crate::secret::lookup_error::no_data(keyid));
        }
        self.secrets.get(keyid)
    }

    fn check_id(&self, id: &str) -> Result<(), String> {
        if self.lock().iter().any(|o| o.id == id) {
            return Err(duplicate(id));
        }
        Ok(())
    }

    /// `object-del` (QEMU's `user_creatable_del`): a throttle group with
    /// members is in use.
    pub fn del(&self, id: &str) -> Result<(), String> {
        let mut l = self.lock();
        let Some(i) = l.iter().position(|o| o.id == id) else {
            return Err(format!("object '{id}' not found"));
        };
        if let ObjectKind::ThrottleGroup(g) = &l[i].kind {
            if g.member_count() > 0 {
                return Err(format!("object '{id}' is in use, can not be deleted"));
            }
        }
        self.secrets.remove(id);
        l.remove(i);
        self.order().remove(id);
        self.tls.remove(id);
        Ok(())
    }

    /// Whether an iothread called `id` exists.
    pub fn has_iothread(&self, id: &str) -> bool {
        self.lock()
            .iter()
            .any(|o| o.id == id && matches!(o.kind, ObjectKind::IoThread(_)))
    }
}

fn duplicate(id: &str) -> String {
    format!("attempt to add duplicate property '{id}' to object (type 'container')")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add(o: &Objects, g: &ThrottleGroups, v: Value) -> Result<(), String> {
        o.add(g, v.as_object().unwrap())
    }

    #[test]
    fn throttle_groups_as_qemu_makes_them() {
        let (o, g) = (Objects::default(), ThrottleGroups::new());
        add(
            &o,
            &g,
            json!({"qom-type": "throttle-group", "id": "tg0",
            "limits": {"bps-total": 1000}, "x-bps-total": 200}),
        )
        .unwrap();
        // The x- properties come after the limits.
        assert_eq!(o.lock()[0].get("x-bps-total").unwrap(), 200);
        assert_eq!(
            o.lock()[0].get("limits").unwrap()["bps-total-max-length"],
            1
        );
        assert_eq!(
            add(&o, &g, json!({"qom-type": "throttle-group", "id": "tg0"})).unwrap_err(),
            "attempt to add duplicate property 'tg0' to object (type 'container')"
        );
        let bad = |v: Value| add(&o, &g, v).unwrap_err();
        assert_eq!(
            bad(json!({"qom-type": "throttle-group", "id": "t", "x-bps-total": -5})),
            "Property values cannot be negative"
        );
        assert_eq!(
            bad(
                json!({"qom-type": "throttle-group", "id": "t", "x-bps-total-max-length": 5_000_000_000u64})
            ),
            "x-bps-total-max-length value must be in therange [0, 4294967295]"
        );
        assert_eq!(
            bad(
                json!({"qom-type": "throttle-group", "id": "t", "limits": {"bps-total-max-length": 5_000_000_000u64}})
            ),
            "bps-total-max-length value must be in the range [0, 4294967295]"
        );
        assert_eq!(
            bad(
                json!({"qom-type": "throttle-group", "id": "t", "limits": {"bps-total": 100, "bps-total-max-length": -1}})
            ),
            "burst length set without burst rate"
        );
        assert_eq!(
            bad(json!({"qom-type": "throttle-group", "id": "1t"})),
            "Parameter 'id' expects an identifier"
        );
        // In use while it has members.
        let m = g.get("tg0").unwrap().join();
        assert_eq!(
            o.del("tg0").unwrap_err(),
            "object 'tg0' is in use, can not be deleted"
        );
        drop(m);
        o.del("tg0").unwrap();
        assert_eq!(o.del("tg0").unwrap_err(), "object 'tg0' not found");
        assert!(g.get("tg0").is_none());
    }

    #[test]
    fn limits_change_over_the_current_ones() {
        let (o, g) = (Objects::default(), ThrottleGroups::new());
        add(
            &o,
            &g,
            json!({"qom-type": "throttle-group", "id": "t", "limits": {"bps-total": 200}}),
        )
        .unwrap();
        let mut l = o.lock();
        assert_eq!(
            l[0].set("limits", &json!({"bps-read": 3})).unwrap_err(),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        l[0].set("limits", &json!({"iops-total": 5})).unwrap();
        let v = l[0].get("limits").unwrap();
        assert_eq!(
            (v["bps-total"].clone(), v["iops-total"].clone()),
            (json!(200), json!(5))
        );
        assert_eq!(
            l[0].set("x-bps-total", &json!(1)).unwrap_err(),
            "Property cannot be set after initialization"
        );
        assert_eq!(
            l[0].get("nope").unwrap_err(),
            "Property 'throttle-group.nope' not found"
        );
    }

    #[test]
    fn iothreads_keep_their_parameters() {
        let (o, g) = (Objects::default(), ThrottleGroups::new());
        assert_eq!(
            add(
                &o,
                &g,
                json!({"qom-type": "iothread", "id": "io0", "poll-max-ns": -1})
            )
            .unwrap_err(),
            "poll-max-ns value must be in range [0, 9223372036854775807]"
        );
        add(
            &o,
            &g,
            json!({"qom-type": "iothread", "id": "io0", "aio-max-batch": 4}),
        )
        .unwrap();
        assert!(o.has_iothread("io0"));
        let l = o.lock();
        assert_eq!(l[0].get("poll-max-ns").unwrap(), 32768);
        assert_eq!(l[0].get("aio-max-batch").unwrap(), 4);
    }

    /// `keyid` names an object under `/objects` (QEMU's
    /// `qcrypto_secret_lookup`, messages recorded with qemu-storage-daemon
    /// 10.0.2).
    #[test]
    fn secrets_find_their_master_key() {
        use blockd_drivers::secrets::Secrets;
        let (o, g) = (Objects::default(), ThrottleGroups::new());
        let iv = "aOQvjia4lZZFEiiGB1jrrQ==";
        let sec = |id: &str, keyid: &str| {
            json!({"qom-type": "secret", "id": id, "format": "base64", "keyid": keyid, "iv": iv,
                "data": "5aJ0Ul9aeMdV3dyIkc9rPlVp7T+zALeXBaODsX2a42Q="})
        };
        add(&o, &g, json!({"qom-type": "iothread", "id": "io0"})).unwrap();
        add(
            &o,
            &g,
            json!({"qom-type": "secret", "id": "m", "format": "base64",
                "data": "RJZYN+MMOGdynvduqROtolVroETZnCc1Gigta8PRg54="}),
        )
        .unwrap();
        let bad = |v: Value| add(&o, &g, v).unwrap_err();
        assert_eq!(bad(sec("s", "nosuch")), "No secret with id 'nosuch'");
        assert_eq!(bad(sec("s", "io0")), "Object with id 'io0' is not a secret");
        assert_eq!(bad(sec("s", "s")), "Secret with id 's' has no data");
        add(&o, &g, sec("s", "m")).unwrap();
        // Decrypted once: the master key can go.
        o.del("m").unwrap();
        assert_eq!(
            o.secrets.lookup_base64("s").unwrap(),
            crate::secret::base64_encode(b"ceph-secret-value")
        );
        assert_eq!(o.lock()[1].get("keyid").unwrap(), "m");
        // A driver's key-secret naming another object: QEMU's words.
        assert_eq!(
            o.secrets.lookup_base64("io0").unwrap_err(),
            "Object with id 'io0' is not a secret"
        );
        assert_eq!(
            o.secrets.lookup("nosuch").unwrap_err(),
            "No secret with id 'nosuch'"
        );
        o.del("io0").unwrap();
        assert_eq!(
            o.secrets.lookup("io0").unwrap_err(),
            "No secret with id 'io0'"
        );
    }
}
