//! Queries racing with graph changes: one client adds and deletes chains
//! of nodes in a loop while another lists them (`query-named-block-nodes`
//! flat and nested, `x-debug-query-block-graph`, `query-block-exports`).
//! A query must never fail or crash the server because a node it was
//! describing (or that node's parent) went away meanwhile: parents are
//! typed back-edges now, not names looked up again.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

#[test]
fn queries_race_with_blockdev_add_and_del() {
    let mut srv = Server::start("qrace");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = srv.client();
    let mut reader = srv.client();
    let r = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for (cmd, args) in [
                    ("query-named-block-nodes", Some(json!({"flat": false}))),
                    ("query-named-block-nodes", Some(json!({"flat": true}))),
                    ("x-debug-query-block-graph", None),
                ] {
                    let v = reader
                        .execute(cmd, args)
                        .unwrap_or_else(|e| panic!("{cmd} failed during graph changes: {e}"));
                    assert!(v.is_array() || v.is_object());
                    n += 1;
                }
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < deadline {
        for i in 0..4 {
            writer
                .execute(
                    "blockdev-add",
                    Some(json!({"driver": "raw", "node-name": format!("p{i}"),
                                "file": {"driver": "null-co", "node-name": format!("n{i}")}})),
                )
                .unwrap();
            writer
                .execute(
                    "blockdev-add",
                    Some(json!({"driver": "raw", "node-name": format!("q{i}"), "file": format!("p{i}")})),
                )
                .unwrap();
        }
        for i in 0..4 {
            writer
                .execute("blockdev-del", Some(json!({"node-name": format!("q{i}")})))
                .unwrap();
            writer
                .execute("blockdev-del", Some(json!({"node-name": format!("p{i}")})))
                .unwrap();
        }
        rounds += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let queries = r.join().expect("a query failed");
    assert!(
        rounds > 10 && queries > 10,
        "{rounds} rounds, {queries} queries"
    );
    common::alive_check(&mut writer, &mut srv, "after the race");
}
