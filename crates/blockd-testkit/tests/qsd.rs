//! Checks the client and the runner against a real `qemu-storage-daemon`.
//! Skipped (with a message) when it is not on PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockd_testkit::process::make_scratch_dir;
use blockd_testkit::{run_script, ClientError, Outcome, Pattern, QmpClient, RunOptions};
use serde_json::json;

const QSD_TEMPLATE: &str = "qemu-storage-daemon \
    --chardev socket,path={sock},server=on,wait=off,id=m0 --monitor chardev=m0 \
    --chardev socket,path={sock2},server=on,wait=off,id=m1 --monitor chardev=m1";

fn have_qsd() -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-storage-daemon").is_file())
    });
    if !found {
        eprintln!("SKIP: qemu-storage-daemon is not on PATH");
    }
    found
}

/// A QSD with one monitor socket, killed on drop.
struct Qsd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Qsd {
    fn start() -> Qsd {
        let dir = make_scratch_dir(Path::new("/tmp/btq")).unwrap();
        let sock = dir.join("m.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m0",
                sock.display()
            ))
            .args(["--monitor", "chardev=m0"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Qsd { child, dir, sock }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn client_against_qsd() {
    if !have_qsd() {
        return;
    }
    let qsd = Qsd::start();
    let t = Duration::from_secs(10);
    let mut c = QmpClient::connect_retry(&qsd.sock, t).unwrap();
    let greeting = c.negotiate().unwrap();
    assert!(greeting["QMP"]["version"]["qemu"]["major"].is_u64());
    let v = c.execute("query-version", None).unwrap();
    assert!(v["qemu"].is_object());
    match c.execute("blockdev-del", Some(json!({"node-name": "nope"}))) {
        Err(ClientError::Qmp { class, .. }) => assert_eq!(class, "GenericError"),
        other => panic!("expected a QMP error, got {other:?}"),
    }
    let img = qsd.dir.join("new.img");
    c.execute(
        "blockdev-create",
        Some(
            json!({"job-id": "j0", "options": {"driver": "file", "filename": img, "size": 65536}}),
        ),
    )
    .unwrap();
    let concluded = Pattern::parse(
        r#"{"event": "JOB_STATUS_CHANGE", "data": {"id": "j0", "status": "concluded"}}"#,
    )
    .unwrap();
    c.wait_event(&concluded, t).unwrap();
    // the earlier state changes are still queued, in order
    let created =
        Pattern::parse(r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created"}}"#).unwrap();
    assert!(c.find_event(&created, Duration::ZERO).unwrap().is_some());
    c.execute("job-dismiss", Some(json!({"id": "j0"}))).unwrap();
    // raw malformed input gets an error reply and the session goes on
    c.send_raw(b"{\"execute\": foo}\n").unwrap();
    let r = c.next_response(t).unwrap();
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(c.execute("query-version", None).is_ok());
}

#[test]
fn runner_against_qsd() {
    if !have_qsd() {
        return;
    }
    let opts = RunOptions {
        server: QSD_TEMPLATE.into(),
        verbose: false,
        keep: false,
    };
    let hello = "< {\"QMP\": {\"version\": \"$any\", \"capabilities\": \"$any\"}}\n\
                 > {\"execute\": \"qmp_capabilities\"}\n\
                 < {\"return\": {}}\n";
    let pass = format!(
        "$ qemu-img create -f raw ${{TMP}}/d.raw 1M || truncate -s 1M d.raw\n{hello}\
         @2 < {{\"QMP\": \"$obj\"}}\n\
         @2 > {{\"execute\": \"qmp_capabilities\"}}\n\
         @2 < {{\"return\": {{}}}}\n\
         > {{\"execute\": \"blockdev-add\", \"arguments\": {{\"driver\": \"file\", \"node-name\": \"f0\", \"filename\": \"${{TMP}}/d.raw\"}}}}\n\
         < {{\"return\": {{}}}}\n\
         @2 > {{\"execute\": \"query-named-block-nodes\", \"arguments\": {{\"flat\": true}}}}\n\
         @2 < {{\"return\": [\"$contains\", {{\"node-name\": \"f0\", \"file\": \"${{TMP}}/d.raw\", \"backing_file\": \"$absent\"}}]}}\n"
    );
    assert_eq!(run_script(&pass, &opts), Outcome::Pass);

    let wrong = format!(
        "{hello}> {{\"execute\": \"query-version\"}}\n< {{\"return\": {{\"package\": 1}}}}\n"
    );
    let f = run_script(&wrong, &opts).failure().cloned().expect("fails");
    assert_eq!(f.line, 5, "{f}");
    assert!(f.received.unwrap().contains("\"package\""));

    let forbidden = format!(
        "{hello}> {{\"execute\": \"blockdev-create\", \"arguments\": {{\"job-id\": \"c0\", \"options\": {{\"driver\": \"file\", \"filename\": \"${{TMP}}/n.img\", \"size\": 65536}}}}}}\n\
         < {{\"return\": {{}}}}\n!! {{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {{\"status\": \"concluded\"}}}}\n"
    );
    let f = run_script(&forbidden, &opts)
        .failure()
        .cloned()
        .expect("fails");
    assert_eq!(f.line, 6, "{f}");
}
