//! Paths and properties as qemu-storage-daemon 10.0.2 answers them.

use super::*;
use crate::objects::Objects;
use blockd_core::throttle::ThrottleGroups;
use serde_json::json;

fn setup(ids: &[(&str, &str)]) -> Objects {
    let (o, g) = (Objects::default(), ThrottleGroups::new());
    for (ty, id) in ids {
        o.add(&g, json!({"qom-type": ty, "id": id}).as_object().unwrap())
            .unwrap();
    }
    o
}

fn names(v: Vec<(String, String)>) -> Vec<String> {
    v.into_iter().map(|p| format!("{}:{}", p.0, p.1)).collect()
}

#[test]
fn paths_resolve_as_object_resolve_path() {
    let o = setup(&[
        ("throttle-group", "tg0"),
        ("iothread", "io0"),
        ("throttle-group", "objects"),
    ]);
    assert_eq!(
        names(list(&o, "/objects").unwrap()),
        [
            "type:string",
            "io0:child<iothread>",
            "objects:child<throttle-group>",
            "tg0:child<throttle-group>"
        ]
    );
    assert_eq!(
        names(list(&o, "/").unwrap()),
        [
            "type:string",
            "backend:child<container>",
            "objects:child<container>",
            "chardevs:child<container>"
        ]
    );
    // Partial paths: one match, or ambiguous.
    assert_eq!(list(&o, "io0").unwrap().len(), 7);
    assert_eq!(list(&o, "objects/tg0").unwrap().len(), 21);
    assert_eq!(list(&o, "//objects//io0/").unwrap().len(), 7);
    assert_eq!(
        list(&o, "objects").unwrap_err(),
        QomError::Ambiguous("objects".into())
    );
    assert_eq!(
        list(&o, "").unwrap_err().to_string(),
        "Path '' is ambiguous"
    );
    assert_eq!(
        get(&o, "objects", "type").unwrap_err().to_string(),
        "Device 'objects' not found"
    );
    for p in ["/io0", "/objects/..", "nope", "/nope"] {
        assert_eq!(list(&o, p).unwrap_err(), QomError::NotFound(p.into()));
    }
    assert_eq!(
        get(&o, "/objects/objects", "type").unwrap(),
        "throttle-group"
    );
}

#[test]
fn containers_have_children_and_a_type() {
    let o = setup(&[("iothread", "io1")]);
    assert_eq!(get(&o, "/", "type").unwrap(), "container");
    assert_eq!(get(&o, "/", "backend").unwrap(), "/backend");
    assert_eq!(get(&o, "/objects", "io1").unwrap(), "/objects/io1");
    assert_eq!(
        get(&o, "/", "nope").unwrap_err().to_string(),
        "Property 'container.nope' not found"
    );
    let v = json!("x");
    assert_eq!(
        set(&o, "/", "objects", &v).unwrap_err().to_string(),
        "Property 'container.objects' is not writable"
    );
    assert_eq!(
        set(&o, "/objects", "type", &v).unwrap_err().to_string(),
        "Property 'container.type' is not writable"
    );
    assert_eq!(
        set(&o, "/zz", "type", &v).unwrap_err(),
        QomError::NotFound("/zz".into())
    );
}

#[test]
fn iothread_pool_bounds_are_checked_after_the_value_is_stored() {
    let o = setup(&[("iothread", "io0")]);
    set(&o, "io0", "thread-pool-min", &json!(10)).unwrap();
    let bad = |p: &str, v: Value| set(&o, "io0", p, &v).unwrap_err().to_string();
    assert_eq!(
        bad("thread-pool-min", json!(100)),
        "bad thread-pool-min/thread-pool-max values"
    );
    assert_eq!(get(&o, "io0", "thread-pool-min").unwrap(), 100);
    // Every later event-loop parameter is refused while the pool is bad,
    // but the poll parameters are not checked.
    assert_eq!(
        bad("aio-max-batch", json!(3)),
        "bad thread-pool-min/thread-pool-max values"
    );
    assert_eq!(get(&o, "io0", "aio-max-batch").unwrap(), 3);
    set(&o, "io0", "poll-grow", &json!(2)).unwrap();
    assert_eq!(
        bad("poll-max-ns", json!("x")),
        "Invalid parameter type for 'poll-max-ns', expected: integer"
    );
    assert_eq!(
        bad("poll-max-ns", json!(u64::MAX)),
        "Invalid parameter type for 'poll-max-ns', expected: integer"
    );
    assert_eq!(
        bad("type", json!(1)),
        "Property 'iothread.type' is not writable"
    );
    set(&o, "io0", "thread-pool-min", &json!(64)).unwrap();
}

#[test]
fn throttle_limits_are_read_as_qemu_visits_them() {
    let o = setup(&[("throttle-group", "tg0")]);
    let bad = |v: Value| set(&o, "tg0", "limits", &v).unwrap_err().to_string();
    assert_eq!(
        bad(json!(5)),
        "Invalid parameter type for 'limits', expected: object"
    );
    assert_eq!(
        bad(json!({"bogus": 1})),
        "Parameter 'limits.bogus' is unexpected"
    );
    assert_eq!(
        bad(json!({"bps-total": "x", "bogus": 1})),
        "Invalid parameter type for 'limits.bps-total', expected: integer"
    );
    assert_eq!(
        bad(json!({"bps-total-max-length": 5_000_000_000u64, "bps-total": 1.5})),
        "Invalid parameter type for 'limits.bps-total', expected: integer"
    );
    assert_eq!(
        bad(json!({"bps-total": 100, "iops-size": 5})),
        "iops size requires an iops value to be set"
    );
    set(&o, "tg0", "limits", &json!({"iops-total": 100})).unwrap();
    assert_eq!(get(&o, "tg0", "x-iops-total").unwrap(), 100);
    assert_eq!(
        set(&o, "tg0", "x-bps-total", &json!("x"))
            .unwrap_err()
            .to_string(),
        "Property cannot be set after initialization"
    );
    assert_eq!(
        bad(json!({"bps-total": -1})),
        "bps/iops/max values must be within [0, 1000000000000000]"
    );
}

#[test]
fn types_and_their_properties() {
    assert_eq!(type_properties("event-loop-base").unwrap().len(), 4);
    assert_eq!(
        type_properties("nope").unwrap_err().to_string(),
        "Class 'nope' not found"
    );
    assert_eq!(
        type_properties("user-creatable").unwrap_err().to_string(),
        "Parameter 'typename' expects a QOM type"
    );
}
