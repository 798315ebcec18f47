//! TLS for NBD against QEMU's tools and between two blockd processes,
//! with certificates made at test time (rcgen): qemu-io/qemu-img and
//! nbdinfo as clients of blockd's TLS server, blockd's `nbd` driver as a
//! client of `qemu-nbd --tls-creds` and of another blockd, and the
//! refusals (no TLS, wrong CA, expired certificate, a name the authz
//! refuses, a host name that does not match) with QEMU's messages.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockd_testkit::QmpClient;
use certs::Ca;
use common::Server;
use serde_json::{json, Value};

/// The client certificate's subject, as GnuTLS (and so QEMU's authz)
/// writes it.
const CLIENT_DN: &str = "C=GB,O=Cthulhu\\, Inc.,CN=client one";

fn have_tools() -> bool {
    ["qemu-nbd", "qemu-img", "qemu-io"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok())
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().expect("run tool")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A TCP port nobody listens on (now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(img: &Path, port: u16, creds_dir: &Path, extra: &str) -> Kill {
    let child = Command::new("qemu-nbd")
        .args([
            "-t",
            "-e",
            "8",
            "-f",
            "raw",
            "-x",
            "exp",
            "--bind",
            "127.0.0.1",
        ])
        .args(["-p", &port.to_string()])
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=t0,dir={},endpoint=server{extra}",
            creds_dir.display()
        ))
        .args(["--tls-creds", "t0"])
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    // (qemu-nbd makes DH parameters first: that takes a while.)
    wait_port(port);
    Kill(child)
}

/// `--object` and `--image-opts` for a QEMU tool over TLS.
fn tls_opts(dir: &Path, port: u16, extra: &str) -> (String, String) {
    (
        format!(
            "tls-creds-x509,id=c0,dir={},endpoint=client{extra}",
            dir.display()
        ),
        format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=e,tls-creds=c0"
        ),
    )
}

fn qemu_io(dir: &Path, port: u16, extra: &str, cmds: &[&str]) -> Output {
    let (obj, img) = tls_opts(dir, port, extra);
    let mut c = Command::new("qemu-io");
    c.args(["--object", &obj, "--image-opts", &img]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().expect("qemu-io")
}

/// blockd with a TLS NBD server on `port` exporting a 4 MiB raw image as
/// `e`, writable; `authz`: a `tls-authz` object's arguments.
fn tls_server(tag: &str, dir: &Path, port: u16, authz: Option<Value>) -> Server {
    let srv = Server::start(tag);
    let img = srv.dir.join("disk.raw");
    let o = run(
        "qemu-img",
        &["create", "-q", "-f", "raw", img.to_str().unwrap(), "4M"],
    );
    assert!(o.status.success());
    let mut c = srv.client();
    c.execute(
        "object-add",
        Some(json!({"qom-type": "tls-creds-x509", "id": "t0", "dir": dir, "endpoint": "server"})),
    )
    .unwrap();
    let mut start = json!({"addr": {"type": "inet",
        "data": {"host": "127.0.0.1", "port": port.to_string()}}, "tls-creds": "t0"});
    if let Some(a) = authz {
        c.execute("object-add", Some(a)).unwrap();
        start["tls-authz"] = "az".into();
    }
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "raw", "node-name": "r0",
                    "file": {"driver": "file", "filename": img}})),
    )
    .unwrap();
    c.execute("nbd-server-start", Some(start)).unwrap();
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "e", "writable": true})),
    )
    .unwrap();
    srv
}

#[test]
fn qemu_tools_through_blockds_tls_server() {
    if !have_tools() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let base = std::env::temp_dir().join(format!("blockd-tls-q-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let ca = Ca::new("Test CA");
    let sdir = ca.issue(
        &base.join("server"),
        Some(&["localhost", "127.0.0.1"]),
        false,
    );
    let cdir = ca.issue(&base.join("client"), None, false);
    let expired = ca.issue(&base.join("expired"), None, true);
    let other = Ca::new("Other CA").issue(&base.join("other"), None, false);
    let port = free_port();
    let authz = json!({"qom-type": "authz-list", "id": "az", "policy": "deny",
        "rules": [{"match": "*,CN=client one", "policy": "allow", "format": "glob"}]});
    let srv = tls_server("tls-q", &sdir, port, Some(authz));

    // Data written over TLS reads back.
    let o = qemu_io(
        &cdir,
        port,
        "",
        &[
            "write -P 0x5a 64k 1M",
            "read -P 0x5a 64k 1M",
            "read -P 0 0 64k",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("Pattern verification failed"),
        "{}",
        text(&o)
    );
    let (obj, img) = tls_opts(&cdir, port, "");
    let o = run(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &img],
    );
    assert!(text(&o).contains("virtual size: 4 MiB"), "{}", text(&o));

    // nbdinfo (libnbd's GnuTLS) with the same files.
    if Command::new("nbdinfo").arg("--version").output().is_ok() {
        let uri = format!(
            "nbds://127.0.0.1:{port}/e?tls-certificates={}",
            cdir.display()
        );
        let o = run("nbdinfo", &["--size", &uri]);
        assert_eq!(text(&o).trim(), "4194304", "{}", text(&o));
    }

    // Refused: no TLS, a certificate from another CA, an expired one.
    let o = run(
        "qemu-img",
        &[
            "info",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=e"
            ),
        ],
    );
    assert!(
        text(&o).contains("TLS negotiation required before option 7 (go)"),
        "{}",
        text(&o)
    );
    let nonproper = "Cannot read from TLS channel: The TLS connection was non-properly terminated.";
    // (The client with the other CA refuses the server's certificate
    // itself; the one with the expired certificate is refused.)
    for (dir, extra, why) in [
        (&other, "", "The certificate hasn't got a known issuer"),
        (&expired, ",sanity-check=off", nonproper),
    ] {
        let o = qemu_io(dir, port, extra, &["read 0 4k"]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains(why), "{}", text(&o));
    }
    let log = srv.log();
    assert!(
        log.contains("option negotiation failed: The certificate hasn't got a known issuer"),
        "{log}"
    );
    assert!(
        log.contains("option negotiation failed: The certificate is not trusted"),
        "{log}"
    );

    // The authz decides by the distinguished name; a changed rule applies
    // to the next client.
    let mut c = srv.client();
    c.execute(
        "qom-set",
        Some(json!({"path": "/objects/az", "property": "rules",
                    "value": [{"match": "CN=client one", "policy": "allow"}]})),
    )
    .unwrap();
    let o = qemu_io(&cdir, port, "", &["read 0 4k"]);
    assert!(text(&o).contains(nonproper), "{}", text(&o));
    assert!(
        srv.log()
            .contains(&format!("TLS x509 authz check for {CLIENT_DN} is denied")),
        "{}",
        srv.log()
    );
    c.execute(
        "qom-set",
        Some(json!({"path": "/objects/az", "property": "rules",
                    "value": [{"match": CLIENT_DN, "policy": "allow"}]})),
    )
    .unwrap();
    let o = qemu_io(&cdir, port, "", &["read -P 0x5a 64k 4k"]);
    assert!(o.status.success(), "{}", text(&o));
    // A deleted authz object refuses everyone.
    c.execute("object-del", Some(json!({"id": "az"}))).unwrap();
    let o = qemu_io(&cdir, port, "", &["read 0 4k"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(srv.log().contains("Cannot find QAuthZ object ID az"));
    let _ = std::fs::remove_dir_all(&base);
}

/// Reads one option reply: (option, type, payload).
fn rep(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    let mut d = vec![0u8; be(&h[16..20]) as usize];
    s.read_exact(&mut d).unwrap();
    (be(&h[8..12]), be(&h[12..16]), d)
}

fn opt(s: &mut TcpStream, code: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

#[test]
fn a_client_without_tls_learns_nothing() {
    let base = std::env::temp_dir().join(format!("blockd-tls-raw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    if !have_tools() {
        eprintln!("skipped: qemu-img not installed");
        return;
    }
    let sdir = Ca::new("CA").issue(&base.join("s"), Some(&["localhost"]), false);
    let port = free_port();
    let _srv = tls_server("tls-raw", &sdir, port, None);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    const TLS_REQD: u32 = 0x8000_0005;
    // LIST, INFO and GO: NBD_REP_ERR_TLS_REQD, nothing about the export.
    opt(&mut s, 3, &[]);
    let (o, t, d) = rep(&mut s);
    assert_eq!((o, t), (3, TLS_REQD));
    assert_eq!(d, b"Option 0x3 not permitted before TLS");
    let mut q = 1u32.to_be_bytes().to_vec();
    q.extend_from_slice(b"e");
    q.extend_from_slice(&0u16.to_be_bytes());
    for code in [6u32, 7] {
        opt(&mut s, code, &q);
        let (o, t, d) = rep(&mut s);
        // No NBD_REP_INFO (name, size) came before the error.
        assert_eq!((o, t), (code, TLS_REQD));
        assert_eq!(
            d,
            format!("Option 0x{code:x} not permitted before TLS").as_bytes()
        );
    }
    // EXPORT_NAME cannot be answered: the connection is dropped.
    opt(&mut s, 1, b"e");
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "server sent {rest:?}");
    let _ = std::fs::remove_dir_all(&base);
}

fn add_node(c: &mut blockd_testkit::QmpClient, args: Value) -> Result<Value, String> {
    c.execute("blockdev-add", Some(args)).map_err(|e| match e {
        blockd_testkit::ClientError::Qmp { desc, .. } => desc,
        e => e.to_string(),
    })
}

#[test]
fn blockds_client_against_qemu_nbd_with_tls() {
    if !have_tools() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("tls-cli");
    let base = srv.dir.clone();
    let ca = Ca::new("Test CA");
    let sdir = ca.issue(
        &base.join("server"),
        Some(&["localhost", "127.0.0.1"]),
        false,
    );
    let wrong_name = ca.issue(&base.join("wrongname"), Some(&["otherhost"]), false);
    let expired = ca.issue(&base.join("expired"), Some(&["127.0.0.1"]), true);
    let cdir = ca.issue(&base.join("client"), None, false);
    let other = Ca::new("Other CA").issue(&base.join("other"), None, false);
    let img = base.join("disk.raw");
    let o = run(
        "qemu-img",
        &["create", "-q", "-f", "raw", img.to_str().unwrap(), "2M"],
    );
    assert!(o.status.success());
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 1M",
            img.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let _good = qemu_nbd(&img, p1, &sdir, "");
    let _named = qemu_nbd(&img, p2, &wrong_name, "");
    let _old = qemu_nbd(&img, p3, &expired, ",sanity-check=off");

    let mut c = srv.client();
    for (id, dir) in [("c0", &cdir), ("c1", &other)] {
        c.execute(
            "object-add",
            Some(json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir})),
        )
        .unwrap();
    }
    let node = |name: &str, port: u16, creds: Option<&str>| {
        let mut v = json!({"driver": "nbd", "node-name": name, "export": "exp",
            "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}});
        if let Some(t) = creds {
            v["tls-creds"] = t.into();
        }
        v
    };
    // Good: the data reads back through a re-export of the node.
    add_node(&mut c, node("n0", p1, Some("c0"))).unwrap();
    read_through_reexport(&mut c, &base, "e0", 0x33);

    // Refusals, in QEMU's words (recorded with qemu-storage-daemon 10.0.2).
    let cases = [
        (
            node("n1", p1, Some("c1")),
            "The certificate hasn't got a known issuer",
        ),
        (
            node("n2", p1, None),
            "TLS negotiation required before option 7 (go)",
        ),
        (
            node("n3", p2, Some("c0")),
            "Certificate does not match the hostname 127.0.0.1",
        ),
        (node("n4", p3, Some("c0")), "The certificate is not trusted"),
        (
            node("n5", p1, Some("nope")),
            "No TLS credentials with id 'nope'",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(add_node(&mut c, args).unwrap_err(), want);
    }
    let mut named = node("n6", p2, Some("c0"));
    named["tls-hostname"] = "otherhost".into();
    add_node(&mut c, named).unwrap();
    c.execute(
        "object-add",
        Some(json!({"qom-type": "tls-creds-x509", "id": "s0", "dir": sdir, "endpoint": "server"})),
    )
    .unwrap();
    assert_eq!(
        add_node(&mut c, node("n7", p1, Some("s0"))).unwrap_err(),
        "Expected TLS credentials for a client endpoint"
    );
}

#[test]
fn blockd_to_blockd_over_tls_survives_a_reconnect() {
    if !have_tools() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let base = std::env::temp_dir().join(format!("blockd-tls-bb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let ca = Ca::new("Test CA");
    let sdir = ca.issue(
        &base.join("server"),
        Some(&["localhost", "127.0.0.1"]),
        false,
    );
    let cdir = ca.issue(&base.join("client"), None, false);
    let port = free_port();
    let remote = tls_server(
        "tls-bb-r",
        &sdir,
        port,
        Some(json!({"qom-type": "authz-simple", "id": "az", "identity": CLIENT_DN})),
    );
    let local = Server::start("tls-bb-l");
    let mut lc = local.client();
    lc.execute(
        "object-add",
        Some(json!({"qom-type": "tls-creds-x509", "id": "c0", "dir": cdir})),
    )
    .unwrap();
    add_node(
        &mut lc,
        json!({"driver": "nbd", "node-name": "n0", "export": "e", "reconnect-delay": 10,
               "tls-creds": "c0",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
    )
    .unwrap();
    let sock = local.dir.join("nbd");
    lc.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": sock}}})),
    )
    .unwrap();
    lc.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e1", "node-name": "n0", "name": "x", "writable": true})),
    )
    .unwrap();
    let url = format!("nbd+unix:///x?socket={}", sock.display());
    let io = |cmd: &str| run("qemu-io", &["-f", "raw", "-c", cmd, &url]);
    let o = io("write -P 0x77 0 512k");
    assert!(o.status.success(), "{}", text(&o));
    // The remote server goes away and comes back: the node reconnects,
    // with a new TLS session.
    let mut rc = remote.client();
    rc.execute("nbd-server-stop", None).unwrap();
    rc.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "inet",
            "data": {"host": "127.0.0.1", "port": port.to_string()}},
            "tls-creds": "t0", "tls-authz": "az"})),
    )
    .unwrap();
    rc.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "e", "writable": true})),
    )
    .unwrap();
    let o = io("read -P 0x77 0 512k");
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// Encrypts the key file `path` in place as PKCS#8 PBES2 (AES-256-CBC,
/// PBKDF2-HMAC-SHA256), as `openssl pkcs8 -topk8 -v2 aes-256-cbc` does.
fn encrypt_key(path: &Path, password: &str) {
    let out = path.with_extension("enc");
    let o = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes-256-cbc", "-passout"])
        .arg(format!("pass:{password}"))
        .arg("-in")
        .arg(path)
        .arg("-out")
        .arg(&out)
        .output()
        .expect("openssl");
    assert!(o.status.success(), "{}", text(&o));
    std::fs::rename(&out, path).unwrap();
    let pem = std::fs::read_to_string(path).unwrap();
    assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
}

/// Encrypted keys on both sides, each read with the password in the
/// secret `passwordid` names: blockd's server (verifying its peer) serves
/// QEMU's tools and blockd's own `nbd` driver, whose client keys are
/// encrypted too.
#[test]
fn encrypted_keys_with_passwordid() {
    if !have_tools() || Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: qemu tools or openssl not installed");
        return;
    }
    let base = std::env::temp_dir().join(format!("blockd-tls-pw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let ca = Ca::new("Test CA");
    let sdir = ca.issue(
        &base.join("server"),
        Some(&["localhost", "127.0.0.1"]),
        false,
    );
    let cdir = ca.issue(&base.join("client"), None, false);
    // (Not ASCII: the password is the secret's UTF-8 text.)
    let (spw, cpw) = ("server p\u{e4}ss", "client pass");
    encrypt_key(&sdir.join("server-key.pem"), spw);
    encrypt_key(&cdir.join("client-key.pem"), cpw);

    let srv = Server::start("tls-pw");
    let img = srv.dir.join("disk.raw");
    let o = run(
        "qemu-img",
        &["create", "-q", "-f", "raw", img.to_str().unwrap(), "4M"],
    );
    assert!(o.status.success());
    let mut c = srv.client();
    let creds = json!({"qom-type": "tls-creds-x509", "id": "t0", "dir": sdir,
                       "endpoint": "server", "passwordid": "kp"});
    // Without the secret, then with it.
    let e = c.execute("object-add", Some(creds.clone())).unwrap_err();
    assert!(e.to_string().contains("No secret with id 'kp'"), "{e}");
    c.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": "kp", "data": spw})),
    )
    .unwrap();
    c.execute("object-add", Some(creds)).unwrap();
    let port = free_port();
    // (The authz admits the client certificate only: each client must
    // present it, so proves that it holds the decrypted key.)
    for (cmd, args) in [
        (
            "object-add",
            json!({"qom-type": "authz-simple", "id": "az", "identity": CLIENT_DN}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r0",
                   "file": {"driver": "file", "filename": img}}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "inet",
                "data": {"host": "127.0.0.1", "port": port.to_string()}},
                "tls-creds": "t0", "tls-authz": "az"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "e", "writable": true}),
        ),
    ] {
        c.execute(cmd, Some(args)).unwrap();
    }

    // qemu-io, its client key encrypted too.
    let secret = format!("secret,id=cp,data={cpw}");
    let (obj, image) = tls_opts(&cdir, port, ",passwordid=cp");
    let o = Command::new("qemu-io")
        .args([
            "--object",
            &secret,
            "--object",
            &obj,
            "--image-opts",
            &image,
        ])
        .args(["-c", "write -P 0x3c 0 1M", "-c", "read -P 0x3c 0 1M"])
        .output()
        .unwrap();
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
    let o = Command::new("qemu-img")
        .args([
            "info",
            "--object",
            &secret,
            "--object",
            &obj,
            "--image-opts",
            &image,
        ])
        .output()
        .unwrap();
    assert!(text(&o).contains("virtual size: 4 MiB"), "{}", text(&o));

    // blockd's nbd driver, with the encrypted client key.
    let local = Server::start("tls-pw-l");
    let mut lc = local.client();
    let ccreds = json!({"qom-type": "tls-creds-x509", "id": "c0", "dir": cdir, "passwordid": "cp"});
    lc.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": "cp", "data": "wrong"})),
    )
    .unwrap();
    let e = lc.execute("object-add", Some(ccreds.clone())).unwrap_err();
    let key = cdir.join("client-key.pem");
    let want = format!(
        "Cannot load certificate '{}' & key '{}': Decryption has failed.",
        cdir.join("client-cert.pem").display(),
        key.display()
    );
    assert!(e.to_string().contains(&want), "{e}");
    lc.execute("object-del", Some(json!({"id": "cp"}))).unwrap();
    lc.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": "cp", "data": cpw})),
    )
    .unwrap();
    lc.execute("object-add", Some(ccreds)).unwrap();
    add_node(
        &mut lc,
        json!({"driver": "nbd", "node-name": "n0", "export": "e", "tls-creds": "c0",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
    )
    .unwrap();
    read_through_reexport(&mut lc, &local.dir, "e1", 0x3c);
    // The passwords never reach the logs.
    for log in [srv.log(), local.log()] {
        assert!(!log.contains(spw) && !log.contains(cpw), "{log}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Re-exports node `n0` (export `id`, name `x`) on a Unix socket in `dir`
/// and reads it with qemu-io: 1 MiB of `pattern`, then 1 MiB of zeroes.
fn read_through_reexport(c: &mut QmpClient, dir: &Path, id: &str, pattern: u8) {
    let sock = dir.join("nbd");
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": sock}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": id, "node-name": "n0", "name": "x"})),
    )
    .unwrap();
    let url = format!("nbd+unix:///x?socket={}", sock.display());
    let read = format!("read -P {pattern:#x} 0 1M");
    let o = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            &read,
            "-c",
            "read -P 0 1M 1M",
            &url,
        ],
    );
    assert!(
        o.status.success() && !text(&o).contains("failed"),
        "{}",
        text(&o)
    );
}
