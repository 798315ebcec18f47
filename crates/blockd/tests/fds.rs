//! Descriptor passing over the QMP socket (SCM_RIGHTS): getfd/closefd,
//! add-fd/remove-fd/query-fdsets, as libvirt uses them.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn start(tag: &str) -> (Server, PathBuf) {
    let d = PathBuf::from(format!("/tmp/bf-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let sock = d.join("s");
    let child = Command::new(env!("CARGO_BIN_EXE_blockd"))
        .arg("--qmp")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    (Server(child, d.clone()), sock)
}

struct Conn {
    s: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn open(sock: &PathBuf) -> Conn {
        // The socket file appears at bind(), a moment before listen():
        // retry briefly instead of failing on that window.
        let deadline = Instant::now() + Duration::from_secs(5);
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connect {}: {e}", sock.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        let mut c = Conn { s, r };
        c.reply();
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"}), None),
            json!({"return": {}})
        );
        c
    }

    fn reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Sends a command, with a descriptor attached if given.
    fn cmd(&mut self, c: Value, fd: Option<i32>) -> Value {
        let bytes = serde_json::to_vec(&c).unwrap();
        match fd {
            None => self.s.write_all(&bytes).unwrap(),
            Some(fd) => send_with_fd(&self.s, &bytes, fd),
        }
        self.reply()
    }
}

fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: i32) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the control buffer is large enough for one cmsghdr with one
    // int, and msg points at it; the kernel copies everything in sendmsg.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        assert_eq!(libc::sendmsg(s.as_raw_fd(), &msg, 0), bytes.len() as isize);
    }
}

fn err(v: &Value) -> &str {
    v["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

#[test]
fn getfd_and_closefd() {
    let (_srv, sock) = start("getfd");
    let mut c = Conn::open(&sock);
    let f = std::fs::File::open("/dev/null").unwrap();
    let r = c.cmd(
        json!({"execute": "getfd", "arguments": {"fdname": "a"}}),
        None,
    );
    assert_eq!(err(&r), "No file descriptor supplied via SCM_RIGHTS");
    let r = c.cmd(
        json!({"execute": "getfd", "arguments": {"fdname": "1a"}}),
        Some(f.as_raw_fd()),
    );
    assert_eq!(
        err(&r),
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    let r = c.cmd(
        json!({"execute": "getfd", "arguments": {"fdname": "a"}}),
        Some(f.as_raw_fd()),
    );
    assert_eq!(r, json!({"return": {}}));
    // Names are per connection.
    let mut other = Conn::open(&sock);
    let r = other.cmd(
        json!({"execute": "closefd", "arguments": {"fdname": "a"}}),
        None,
    );
    assert_eq!(err(&r), "File descriptor named 'a' not found");
    let r = c.cmd(
        json!({"execute": "closefd", "arguments": {"fdname": "a"}}),
        None,
    );
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd(
        json!({"execute": "closefd", "arguments": {"fdname": "a"}}),
        None,
    );
    assert_eq!(err(&r), "File descriptor named 'a' not found");
}

#[test]
fn fdsets() {
    let (_srv, sock) = start("fdsets");
    let mut c = Conn::open(&sock);
    let ro = std::fs::File::open("/dev/null").unwrap();
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    let r = c.cmd(json!({"execute": "add-fd"}), None);
    assert_eq!(err(&r), "No file descriptor supplied via SCM_RIGHTS");
    let r = c.cmd(
        json!({"execute": "add-fd", "arguments": {"opaque": "ro"}}),
        Some(ro.as_raw_fd()),
    );
    assert_eq!(r["return"]["fdset-id"], 0);
    let fd0 = r["return"]["fd"].as_i64().unwrap();
    let r = c.cmd(
        json!({"execute": "add-fd", "arguments": {"fdset-id": 3, "opaque": "rw"}}),
        Some(rw.as_raw_fd()),
    );
    assert_eq!(r["return"]["fdset-id"], 3);
    let r = c.cmd(
        json!({"execute": "add-fd", "arguments": {"fdset-id": 3}}),
        Some(ro.as_raw_fd()),
    );
    let fd3b = r["return"]["fd"].as_i64().unwrap();
    let r = c.cmd(
        json!({"execute": "add-fd", "arguments": {"fdset-id": -1}}),
        Some(ro.as_raw_fd()),
    );
    assert_eq!(err(&r), "Parameter 'fdset-id' expects a non-negative value");
    // Without an id, the lowest free one.
    let r = c.cmd(json!({"execute": "add-fd"}), Some(ro.as_raw_fd()));
    assert_eq!(r["return"]["fdset-id"], 1);
    let q = c.cmd(json!({"execute": "query-fdsets"}), None);
    let ids: Vec<i64> = q["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["fdset-id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [3, 1, 0]);
    assert_eq!(q["return"][2]["fds"], json!([{"fd": fd0, "opaque": "ro"}]));
    assert_eq!(q["return"][0]["fds"].as_array().unwrap().len(), 2);
    // Errors of remove-fd, worded as QEMU.
    let r = c.cmd(
        json!({"execute": "remove-fd", "arguments": {"fdset-id": 9}}),
        None,
    );
    assert_eq!(err(&r), "File descriptor named 'fdset-id:9' not found");
    let r = c.cmd(
        json!({"execute": "remove-fd", "arguments": {"fdset-id": 3, "fd": 999}}),
        None,
    );
    assert_eq!(
        err(&r),
        "File descriptor named 'fdset-id:3, fd:999' not found"
    );
    let r = c.cmd(
        json!({"execute": "remove-fd", "arguments": {"fdset-id": 3, "fd": fd3b}}),
        None,
    );
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd(
        json!({"execute": "remove-fd", "arguments": {"fdset-id": 0}}),
        None,
    );
    assert_eq!(r, json!({"return": {}}));
    let q = c.cmd(json!({"execute": "query-fdsets"}), None);
    let ids: Vec<i64> = q["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["fdset-id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [3, 1]);
}

/// The `nbd` driver's `server: {type: fd, str: NAME}` takes a descriptor
/// the same monitor named with `getfd` (QEMU's `socket_get_fd` in a
/// monitor; qemu-storage-daemon has no `getfd`): here a connection to
/// the server's own NBD export. The name is used up; another monitor's
/// names are not visible; a descriptor that is not a socket is refused.
#[test]
fn nbd_node_on_a_named_descriptor() {
    let (_srv, sock) = start("nbdfd");
    let mut c = Conn::open(&sock);
    let nbd = sock.with_file_name("nbd");
    for cmd in [
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co",
               "node-name": "z", "size": 1048576, "read-zeroes": true}}),
        json!({"execute": "nbd-server-start", "arguments": {
               "addr": {"type": "unix", "data": {"path": nbd}}}}),
        json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e",
               "node-name": "z", "name": "exp"}}),
    ] {
        assert_eq!(c.cmd(cmd, None), json!({"return": {}}));
    }
    let add = |fd: &str| {
        json!({"execute": "blockdev-add", "arguments": {"driver": "nbd", "node-name": "n", "read-only": true,
               "export": "exp", "server": {"type": "fd", "str": fd}}})
    };
    // not a socket
    let f = std::fs::File::open("/dev/null").unwrap();
    let getfd = |n: &str| json!({"execute": "getfd", "arguments": {"fdname": n}});
    assert_eq!(
        c.cmd(getfd("f"), Some(f.as_raw_fd())),
        json!({"return": {}})
    );
    assert_eq!(
        err(&c.cmd(add("f"), None)),
        "File descriptor 'f' is not a socket"
    );
    // another monitor's name
    let s = UnixStream::connect(&nbd).unwrap();
    assert_eq!(
        c.cmd(getfd("s"), Some(s.as_raw_fd())),
        json!({"return": {}})
    );
    drop(s);
    let mut other = Conn::open(&sock);
    assert_eq!(
        err(&other.cmd(add("s"), None)),
        "File descriptor named 's' has not been found"
    );
    // this monitor's: the node reads the export, and the name is used up
    assert_eq!(c.cmd(add("s"), None), json!({"return": {}}));
    let q = c.cmd(
        json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        None,
    );
    let n = q["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n")
        .unwrap_or_else(|| panic!("no node n: {q}"));
    assert_eq!(n["image"]["virtual-size"], 1048576);
    assert_eq!(
        err(&c.cmd(
            json!({"execute": "closefd", "arguments": {"fdname": "s"}}),
            None
        )),
        "File descriptor named 's' not found"
    );
}
