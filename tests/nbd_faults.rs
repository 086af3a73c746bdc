//! The NBD target against misbehaving peers and a lagging authority (issue 15 cases
//! 11–14): a fenced node stays out whatever the authority says, a payload that arrives
//! after a fence is never applied and cannot hold the fence, transient refusals are
//! told apart from final ones, and unauthenticated peers cannot grow the target.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use handoff_csi::ids::{NodeId, VolumeId};
use handoff_csi::nbd::node::client::{ClientError, NbdClient};
use handoff_csi::nbd::proto;
use handoff_csi::nbd::target::server::{ExportAuthority, Grant, NbdTarget, Refusal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

fn volume() -> VolumeId {
    VolumeId::parse("vol-00000000000000000000000000000001").unwrap()
}

fn node() -> NodeId {
    NodeId::parse("node-a").unwrap()
}

/// Always grants "disk" (a cache that still lists the node after its unpublish),
/// refuses "denied" for good and "later" for now.
struct Lagging(std::path::PathBuf);

#[async_trait]
impl ExportAuthority for Lagging {
    async fn authorize(&self, name: &str) -> Result<Grant, Refusal> {
        match name {
            "disk" => Ok(Grant {
                volume: volume(),
                node: node(),
                attached_at: chrono::Utc::now() - chrono::Duration::seconds(60),
                path: self.0.clone(),
                readonly: false,
            }),
            "denied" => Err(Refusal::Denied),
            "later" => Err(Refusal::Unavailable("cache refilling".into())),
            _ => Err(Refusal::Unknown),
        }
    }
    async fn still_valid(&self, _grant: &Grant) -> bool {
        true
    }
}

async fn target(limit: usize) -> (Arc<NbdTarget>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = NbdTarget::with_connection_limit(Arc::new(Lagging(image)), limit);
    tokio::spawn(t.clone().serve(listener, std::future::pending()));
    (t, addr, dir)
}

/// Case 11: the authority's view lags (it still grants the node), yet a fenced
/// attachment cannot reconnect.
#[tokio::test]
async fn a_fenced_node_is_refused_even_while_the_authority_still_grants_it() {
    let (t, addr, _dir) = target(64).await;
    let mut c = NbdClient::connect(&addr, "disk").await.unwrap();
    c.write(0, &[1u8; 512], true).await.unwrap();
    assert_eq!(t.fence(&volume(), &node()).await.unwrap(), 1);
    assert!(c.write(0, &[2u8; 512], true).await.is_err(), "cut off");
    for _ in 0..3 {
        match NbdClient::connect(&addr, "disk").await {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, proto::REP_ERR_POLICY),
            Ok(_) => panic!("a fenced attachment reconnected"),
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

/// Bytes of a client that opens "disk" with NBD_OPT_GO.
fn handshake() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes());
    let info = proto::info_request("disk");
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    b.extend_from_slice(&(info.len() as u32).to_be_bytes());
    b.extend_from_slice(&info);
    b
}

/// Case 12: a WRITE whose payload has not arrived when the fence comes neither holds
/// the fence nor lands afterwards.
#[tokio::test]
async fn a_payload_arriving_after_the_fence_is_not_applied_and_cannot_hold_it() {
    let (t, addr, dir) = target(64).await;
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&handshake()).await.unwrap();
    let req = proto::Request {
        flags: 0,
        kind: proto::CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 4096,
    };
    s.write_all(&proto::encode_request(&req)).await.unwrap();
    s.write_all(&[0xAB; 100]).await.unwrap(); // a payload that trickles
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fenced = tokio::time::timeout(Duration::from_secs(5), t.fence(&volume(), &node()))
        .await
        .expect("a trickling payload must not hold the fence");
    assert_eq!(fenced.unwrap(), 1);
    let _ = s.write_all(&[0xAB; 3996]).await; // the rest, too late
    tokio::time::sleep(Duration::from_millis(200)).await;
    let image = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert!(
        image[..4096].iter().all(|b| *b == 0),
        "the late write landed"
    );
}

/// Case 13: "cannot check now" is a distinct, retryable reply; a policy refusal is not.
#[tokio::test]
async fn transient_and_final_refusals_are_told_apart() {
    let (_t, addr, _dir) = target(64).await;
    let code = |r: Result<NbdClient, ClientError>| match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(
        code(NbdClient::connect(&addr, "later").await),
        proto::REP_ERR_SHUTDOWN
    );
    assert_eq!(
        code(NbdClient::connect(&addr, "denied").await),
        proto::REP_ERR_POLICY
    );
    let later = NbdClient::connect(&addr, "later").await.err().unwrap();
    let denied = NbdClient::connect(&addr, "denied").await.err().unwrap();
    assert!(later.retry_later() && !denied.retry_later());
}

/// Cannot check for the first few tries, then grants "disk".
struct Refilling(std::path::PathBuf, AtomicUsize);

#[async_trait]
impl ExportAuthority for Refilling {
    async fn authorize(&self, name: &str) -> Result<Grant, Refusal> {
        if self.1.fetch_add(1, Ordering::SeqCst) < 3 {
            return Err(Refusal::Unavailable("cache refilling".into()));
        }
        Lagging(self.0.clone()).authorize(name).await
    }
    async fn still_valid(&self, _grant: &Grant) -> bool {
        true
    }
}

/// Case 13 on the node: the FUSE client started while the target cannot check yet comes
/// up once it can, instead of failing the volume for good.
#[tokio::test]
async fn the_node_client_retries_a_transient_refusal() {
    if !support::require_root("the_node_client_retries_a_transient_refusal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    std::fs::write(&image, [0x42u8; 4096]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = NbdTarget::new(Arc::new(Refilling(image, AtomicUsize::new(0))));
    tokio::spawn(t.serve(listener, std::future::pending()));
    let mnt = tempfile::Builder::new()
        .prefix("handoff-test-nbd-retry")
        .tempdir()
        .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["nbd-client", "--address", &addr, "--mountpoint"])
        .arg(mnt.path())
        .args(["--io-timeout", "5s"])
        .env("HANDOFF_LOG_LEVEL", "warn")
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"disk\n").await.unwrap();
    drop(stdin);
    let disk = mnt.path().join("disk");
    let mut up = false;
    for _ in 0..200 {
        if std::fs::metadata(&disk).is_ok() {
            up = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nbd-client gave up on a transient refusal: {status}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "the FUSE disk appeared");
    let head = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut b = [0u8; 16];
        std::fs::File::open(&disk)
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        b
    })
    .await
    .unwrap();
    assert_eq!(head, [0x42u8; 16]);
    let _ = nix::mount::umount2(mnt.path(), nix::mount::MntFlags::MNT_DETACH);
    let _ = child.kill().await;
}

/// Case 14: connections beyond the cap are closed at once, and an option longer than a
/// handshake needs is refused before anything is allocated for it.
#[tokio::test]
async fn unauthenticated_peers_cannot_grow_the_target() {
    let (_t, addr, _dir) = target(8).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        held.push(s);
    }
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 18];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("the extra connection is closed, not left waiting");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "no greeting beyond the cap: {n:?}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(proto::MAX_OPTION_LEN + 1).to_be_bytes());
    s.write_all(&opt).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an oversized option ends the connection");
}
