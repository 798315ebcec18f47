//! Server lifecycle: listening, the export table, removal, stop.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockd_nbd::proto::*;
use blockd_nbd::{Listen, NbdServer, ServerOptions};
use common::*;
use tokio::time::timeout;

fn disk() -> Arc<MemDisk> {
    Arc::new(MemDisk::new(1 << 20, false))
}

#[tokio::test]
async fn export_table() {
    let s = serve("tab", "e", disk(), true).await;
    assert!(s.has_export("e"));
    assert!(!s.has_export("f"));
    let err = s.add_export(export("e", disk(), true)).unwrap_err();
    assert_eq!(err, "NBD server already has export named 'e'");
    assert!(s
        .add_export(export(&"n".repeat(4097), disk(), true))
        .is_err());
    assert!(s.remove_export("f", false).is_err());
    assert_eq!(s.export_clients("e"), 0);
    let c = open(&s, "e", Style::Simple).await;
    let c2 = open(&s, "e", Style::Structured).await;
    assert_eq!(s.export_clients("e"), 2);
    drop(c);
    for _ in 0..100 {
        if s.export_clients("e") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.export_clients("e"), 1);
    drop(c2);
    s.stop().await;
}

#[tokio::test]
async fn soft_removal_waits_for_clients() {
    let s = serve("soft", "e", disk(), true).await;
    let mut c = open(&s, "e", Style::Structured).await;
    let mut rx = s.remove_export("e", false).unwrap();
    assert!(!s.has_export("e"));
    // New clients cannot reach it; the name is free again.
    let mut n = Client::connect(&s.local_addr()).await;
    let reps = n.info(OPT_GO, "e", &[]).await;
    assert_eq!(reps[0].ty, REP_ERR_UNKNOWN);
    // The old client keeps working.
    assert_eq!(c.write(0, b"still here", 0).await, 0);
    assert!(rx.try_recv().is_err());
    c.cmd(0, CMD_DISC, 0, 0, 0, &[]).await;
    timeout(Duration::from_secs(5), rx).await.unwrap().unwrap();
    // A removal with no clients fires at once.
    s.add_export(export("e", disk(), true)).unwrap();
    let rx = s.remove_export("e", true).unwrap();
    timeout(Duration::from_secs(1), rx).await.unwrap().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn hard_removal_disconnects_clients_of_that_export_only() {
    let s = serve("hard", "e", disk(), true).await;
    s.add_export(export("other", disk(), true)).unwrap();
    let mut c = open(&s, "e", Style::Extended).await;
    let mut o = open(&s, "other", Style::Simple).await;
    let rx = s.remove_export("e", true).unwrap();
    assert!(c.closed().await);
    timeout(Duration::from_secs(5), rx).await.unwrap().unwrap();
    assert_eq!(o.write(0, b"x", 0).await, 0);
    s.stop().await;
    assert!(o.closed().await);
}

#[tokio::test]
async fn stop_disconnects_and_removes_the_socket() {
    let path = sock_path("stop");
    // A stale file at the path is replaced, as QEMU does.
    std::fs::write(&path, b"stale").unwrap();
    let s = NbdServer::start(Listen::Unix(path.clone()), ServerOptions::default())
        .await
        .unwrap();
    s.add_export(export("e", disk(), true)).unwrap();
    let mut c = open(&s, "e", Style::Simple).await;
    // A client stuck in negotiation is dropped too.
    let mut n = Client::connect(&s.local_addr()).await;
    timeout(Duration::from_secs(5), s.stop()).await.unwrap();
    assert!(c.closed().await);
    assert!(n.closed().await);
    assert!(!path.exists());
    assert!(tokio::net::UnixStream::connect(&path).await.is_err());
    // Stopping twice is fine; adding afterwards is refused.
    s.stop().await;
    assert!(s.add_export(export("f", disk(), true)).is_err());
}

#[tokio::test]
async fn tcp_and_passed_descriptors() {
    let s = NbdServer::start(
        Listen::Tcp {
            host: "127.0.0.1".into(),
            port: "0".into(),
        },
        ServerOptions::default(),
    )
    .await
    .unwrap();
    s.add_export(export("e", disk(), true)).unwrap();
    let addr = s.local_addr();
    assert!(addr.starts_with("127.0.0.1:"));
    let mut t = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut g = [0u8; 18];
    tokio::io::AsyncReadExt::read_exact(&mut t, &mut g)
        .await
        .unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.stop().await;

    // A name with several addresses: every one is listened on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = NbdServer::start(
        Listen::Tcp {
            host: "localhost".into(),
            port: port.to_string(),
        },
        ServerOptions::default(),
    )
    .await
    .unwrap();
    let mut reached = 0;
    for a in tokio::net::lookup_host(("localhost", port)).await.unwrap() {
        let mut t = tokio::net::TcpStream::connect(a).await.unwrap();
        tokio::io::AsyncReadExt::read_exact(&mut t, &mut g)
            .await
            .unwrap();
        reached += 1;
    }
    assert!(reached >= 1);
    s.stop().await;

    // A listening Unix socket passed as a descriptor.
    let path = sock_path("fd");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let s = NbdServer::start(Listen::Fd(l.into()), ServerOptions::default())
        .await
        .unwrap();
    assert_eq!(s.local_addr(), path.display().to_string());
    s.add_export(export("e", disk(), true)).unwrap();
    let mut c = open(&s, "e", Style::Simple).await;
    assert_eq!(c.read(0, 16).await.unwrap(), vec![0; 16]);
    s.stop().await;
    // Not ours to remove.
    assert!(path.exists());
    std::fs::remove_file(&path).unwrap();

    // A listening TCP socket passed as a descriptor.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    let s = NbdServer::start(Listen::Fd(l.into()), ServerOptions::default())
        .await
        .unwrap();
    assert_eq!(s.local_addr(), a);
    s.stop().await;

    // Not a listening socket.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(
        NbdServer::start(Listen::Fd(sock.into()), ServerOptions::default())
            .await
            .is_err()
    );
    let f = std::fs::File::open("/dev/null").unwrap();
    assert!(
        NbdServer::start(Listen::Fd(f.into()), ServerOptions::default())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn max_connections_holds_further_clients_back() {
    let s = NbdServer::start(
        Listen::Unix(sock_path("max")),
        ServerOptions {
            max_connections: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.add_export(export("e", disk(), true)).unwrap();
    let a = open(&s, "e", Style::Simple).await;
    let _b = open(&s, "e", Style::Simple).await;
    let path = s.local_addr();
    let third = tokio::spawn(async move { open_path(&path).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "third client waits for a free slot");
    drop(a);
    let mut c = timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.read(0, 8).await.unwrap(), vec![0; 8]);
    s.stop().await;
}

async fn open_path(path: &str) -> Client {
    let mut c = Client::connect(path).await;
    c.go("e").await;
    c
}

#[tokio::test]
async fn many_clients_at_once() {
    let d = Arc::new(MemDisk::new(4 << 20, false));
    let s = serve("clients", "e", d.clone(), true).await;
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let path = s.local_addr();
        tasks.push(tokio::spawn(async move {
            let mut c = open_path(&path).await;
            for j in 0..8u64 {
                let off = (i * 8 + j) * 8192;
                let data = pattern(8192, (i * 8 + j) as u8);
                assert_eq!(c.write(off, &data, 0).await, 0);
            }
            c.cmd(0, CMD_DISC, 0, 0, 0, &[]).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for k in 0..256u64 {
        assert_eq!(d.get(k * 8192, 8192), pattern(8192, k as u8));
    }
    s.stop().await;
}
