//! The NBD target over real TCP: interop with QEMU's independent NBD implementation in
//! both directions, per-attachment access control, fencing of a node that loses its
//! attachment, and a handshake fuzz.

mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use handoff_csi::export::ExportInfo;
use handoff_csi::ids::{NodeId, VolumeId};
use handoff_csi::nbd::node::client::{ClientError, NbdClient};
use handoff_csi::nbd::target::server::{ExportAuthority, Grant, NbdTarget, Refusal};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is required (Debian package qemu-utils; .ci/run installs it)"
    );
}

async fn nbd_driver() -> (Driver, u16) {
    let port = free_port();
    let d = Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec!["--nbd-listen".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    })
    .await;
    (d, port)
}

/// An RWX block volume on the NBD data plane.
fn nbd_volume_request(name: &str, size: i64) -> csi::CreateVolumeRequest {
    let mut req = create_request(name, size, block_cap(Mode::MultiNodeMultiWriter));
    req.parameters.insert("dataPlane".into(), "nbd".into());
    req
}

async fn rwx_volume(d: &Driver, name: &str, size: i64) -> String {
    d.controller()
        .await
        .create_volume(nbd_volume_request(name, size))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn publish(d: &Driver, id: &str, node: &str) -> HashMap<String, String> {
    d.controller()
        .await
        .controller_publish_volume(publish_request(
            id,
            node,
            block_cap(Mode::MultiNodeMultiWriter),
        ))
        .await
        .unwrap()
        .into_inner()
        .publish_context
}

async fn unpublish(d: &Driver, id: &str, node: &str) {
    d.controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// (address, export name) of an NBD publish_context.
fn nbd_of(ctx: &HashMap<String, String>) -> (String, String) {
    match ExportInfo::from_publish_context(ctx).unwrap() {
        ExportInfo::Nbd { address, export } => (address, export),
        other => panic!("expected an NBD export, got {other:?}"),
    }
}

async fn connect(ctx: &HashMap<String, String>) -> Result<NbdClient, ClientError> {
    let (address, export) = nbd_of(ctx);
    NbdClient::connect(&address, &export).await
}

#[tokio::test]
async fn qemu_reads_and_writes_through_our_target() {
    require_tool("qemu-io");
    let (d, port) = nbd_driver().await;
    let id = rwx_volume(&d, "nbd-qemu", 4 * MIB).await;
    let ctx = publish(&d, &id, "node-a").await;
    let (address, export) = nbd_of(&ctx);
    assert_eq!(address, format!("127.0.0.1:{port}"));
    let uri = format!("nbd://127.0.0.1:{port}/{export}");
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", &uri])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 4 * MIB);
    let out = tokio::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 65536 131072",
            "-c",
            "read -P 0xab 65536 131072",
            "-c",
            "flush",
            "-c",
            "discard 0 65536",
            "-c",
            "read -P 0 0 65536",
            &uri,
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What QEMU wrote, our client reads back, and the image on disk holds.
    let mut c = connect(&ctx).await.unwrap();
    assert_eq!(c.size(), 4 * MIB as u64);
    assert!(c
        .read(65536, 131072)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0xab));
    let image = std::fs::read(d.data_dir().join("volumes").join(format!("{id}.img"))).unwrap();
    assert!(image[65536..196608].iter().all(|&b| b == 0xab));
    // Out-of-range requests are errors, not a crash or a short read.
    assert!(matches!(
        c.read(4 * MIB as u64 - 512, 4096).await,
        Err(ClientError::Errno(22))
    ));
    c.write(0, &[1u8; 512], true).await.unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn our_client_works_against_qemu_nbd() {
    require_tool("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let port = free_port();
    let mut server = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--discard=unmap",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg(&image)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut client = None;
    for _ in 0..100 {
        match NbdClient::connect(&addr, "disk").await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut c = client.expect("qemu-nbd accepted our handshake");
    assert_eq!(c.size(), 8 * MIB as u64);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    c.write(MIB as u64, &data, false).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.read(MIB as u64, 65536).await.unwrap(), data);
    c.trim(MIB as u64, 65536).await.unwrap();
    c.disconnect().await.unwrap();
    // An export qemu-nbd does not have is refused with an error reply, not a hang.
    assert!(matches!(
        NbdClient::connect(&addr, "nope").await,
        Err(ClientError::Refused { .. }) | Err(ClientError::Io(_))
    ));
    let _ = server.kill();
    let _ = server.wait();
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk[MIB as usize..MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0));
}

#[tokio::test]
async fn only_the_current_attachments_secret_opens_an_export() {
    let (d, _) = nbd_driver().await;
    let id = rwx_volume(&d, "nbd-acl", MIB).await;
    let ctx = publish(&d, &id, "node-a").await;
    // The same publish returns the same context (CSI idempotency).
    assert_eq!(publish(&d, &id, "node-a").await, ctx);
    let (addr, name) = nbd_of(&ctx);
    let (addr, name) = (&addr, &name);
    assert!(connect(&ctx).await.is_ok());
    let mut forged = name.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    for (bad, why) in [
        (forged.as_str(), "one hex digit changed"),
        (&name[..name.len() - 2], "truncated"),
        (id.as_str(), "volume id without secret"),
        ("../../etc/passwd", "a path"),
    ] {
        match NbdClient::connect(addr, bad).await {
            Err(ClientError::Refused { .. }) => {}
            Err(e) => panic!("{why}: expected an error reply, got {e}"),
            Ok(_) => panic!("{why}: the export opened"),
        }
    }
    // The secret of an ended attachment no longer opens it, even for the same node.
    unpublish(&d, &id, "node-a").await;
    assert!(matches!(
        connect(&ctx).await,
        Err(ClientError::Refused { .. })
    ));
    let again = publish(&d, &id, "node-a").await;
    assert_ne!(nbd_of(&again).1, nbd_of(&ctx).1, "a new secret");
    assert!(connect(&again).await.is_ok());
}

#[tokio::test]
async fn controller_unpublish_fences_the_migration_source() {
    let (port, metrics_port) = (free_port(), free_port());
    let d = Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec![
            "--nbd-listen".into(),
            format!("127.0.0.1:{port}"),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        ..Default::default()
    })
    .await;
    let id = rwx_volume(&d, "nbd-fence", 4 * MIB).await;
    let ctx_a = publish(&d, &id, "node-a").await;
    let mut a = connect(&ctx_a).await.unwrap();
    let block = |v: u8| vec![v; 4096];
    for i in 0..64u64 {
        a.write(i * 4096, &block(i as u8), false).await.unwrap();
    }
    // Dual attach: the target connects while the source still writes.
    let ctx_b = publish(&d, &id, "node-b").await;
    let mut b = connect(&ctx_b).await.unwrap();
    a.write(64 * 4096, &block(0xaa), true).await.unwrap();

    // Hand-off done; the source is detached. From the moment the call returns OK, the
    // source can write nothing more.
    let started = std::time::Instant::now();
    unpublish(&d, &id, "node-a").await;
    let fence_time = started.elapsed();
    let late = a.write(0, &block(0xee), true).await;
    assert!(
        late.is_err(),
        "the fenced source could still write after ControllerUnpublish returned"
    );
    assert!(matches!(
        connect(&ctx_a).await,
        Err(ClientError::Refused { .. })
    ));
    // The target reads every block the source wrote, and carries on writing.
    for i in 0..64u64 {
        assert_eq!(
            b.read(i * 4096, 4096).await.unwrap(),
            block(i as u8),
            "block {i}"
        );
    }
    assert_eq!(b.read(64 * 4096, 4096).await.unwrap(), block(0xaa));
    b.write(0, &block(0xbb), true).await.unwrap();
    assert_eq!(b.read(0, 4096).await.unwrap(), block(0xbb));
    let text = http_get(metrics_port, "/metrics").1;
    assert!(
        text.contains("handoff_csi_fences_total{result=\"ok\"} 1"),
        "{text}"
    );
    // `handoff-csi attachments` shows who was cut off.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["attachments", "--output", "json", "--state-dir"])
        .arg(d.state_dir())
        .output()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vol = &report["volumes"][0];
    assert_eq!(vol["nodes"][0]["node"], "node-b");
    assert_eq!(vol["fenced"][0]["node"], "node-a", "{report}");
    eprintln!("fence: ControllerUnpublish(source) took {fence_time:?}");
}

/// Grants one fixed export, for the fuzz.
struct OneExport(std::path::PathBuf);

#[async_trait]
impl ExportAuthority for OneExport {
    async fn authorize(&self, name: &str) -> Result<Grant, Refusal> {
        if name != "fuzz" {
            return Err(Refusal::Unknown);
        }
        Ok(Grant {
            volume: VolumeId::parse("vol-00000000000000000000000000000000").unwrap(),
            node: NodeId::parse("node-a").unwrap(),
            attached_at: chrono::DateTime::from_timestamp(0, 0).unwrap(),
            path: self.0.clone(),
            readonly: false,
        })
    }
    async fn still_valid(&self, _grant: &Grant) -> bool {
        true
    }
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshakes_and_commands_never_panic_the_target() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fuzz.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let target = NbdTarget::new(Arc::new(OneExport(image)));
    tokio::spawn(target.serve(listener, std::future::pending()));

    let seed: u64 = std::env::var("HANDOFF_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = Rng::new(seed);
    // A valid client's bytes up to the transmission phase, then requests.
    let mut valid = Vec::new();
    valid.extend_from_slice(&3u32.to_be_bytes());
    let info = handoff_csi::nbd::proto::info_request("fuzz");
    valid.extend_from_slice(&handoff_csi::nbd::proto::IHAVEOPT.to_be_bytes());
    valid.extend_from_slice(&handoff_csi::nbd::proto::OPT_GO.to_be_bytes());
    valid.extend_from_slice(&(info.len() as u32).to_be_bytes());
    valid.extend_from_slice(&info);
    for kind in [0u16, 1, 3, 4, 6, 9] {
        let req = handoff_csi::nbd::proto::Request {
            flags: 0,
            kind,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        valid.extend_from_slice(&handoff_csi::nbd::proto::encode_request(&req));
        if kind == 1 {
            valid.extend_from_slice(&[0x5a; 512]);
        }
    }
    let cases = 300;
    for case in 0..cases {
        let mut bytes = valid.clone();
        match case % 3 {
            // Flip random bytes.
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
            }
            // Truncate anywhere.
            1 => bytes.truncate(rng.below(bytes.len())),
            // Pure noise, sometimes huge lengths.
            _ => {
                let n = rng.below(256);
                bytes = (0..n).map(|_| rng.next() as u8).collect();
            }
        }
        let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
            panic!("case {case}: the target stopped accepting");
        };
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut sink)).await;
    }
    // Still serving a well-behaved client afterwards.
    let mut c = NbdClient::connect(&addr, "fuzz").await.unwrap();
    c.write(0, &[9u8; 512], true).await.unwrap();
    assert_eq!(c.read(0, 512).await.unwrap(), vec![9u8; 512]);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "the target panicked (seed {seed:#x})"
    );
}

/// `handoff-csi nbd-client` serving `ctx`'s export at `mnt`; returns the child.
async fn start_nbd_client(
    ctx: &HashMap<String, String>,
    mnt: &std::path::Path,
) -> tokio::process::Child {
    let (address, export) = nbd_of(ctx);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["nbd-client", "--address"])
        .env("HANDOFF_LOG_LEVEL", "warn")
        .arg(&address)
        .arg("--mountpoint")
        .arg(mnt)
        .args(["--io-timeout", "3s"])
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{export}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    for _ in 0..200 {
        if std::fs::metadata(mnt.join("disk")).is_ok() {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nbd-client exited with {status}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the FUSE disk never appeared");
}

fn losetup(args: &[&str]) -> String {
    let out = Command::new("losetup").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "losetup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_loop_device_over_the_nbd_fuse_disk_is_a_network_block_device() {
    if !require_root("a_loop_device_over_the_nbd_fuse_disk_is_a_network_block_device") {
        return;
    }
    use handoff_csi::datacheck::{open_direct, verify_blocks, write_blocks};
    let (d, _) = nbd_driver().await;
    let id = rwx_volume(&d, "nbd-fuse", 8 * MIB).await;
    let ctx = publish(&d, &id, "node-a").await;
    let mnt = tempfile::Builder::new()
        .prefix("handoff-test-nbd")
        .tempdir()
        .unwrap();
    let mut client = start_nbd_client(&ctx, mnt.path()).await;
    let disk = mnt.path().join("disk");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 8 * MIB as u64);
    let dev = losetup(&["--direct-io=on", "--show", "-f", disk.to_str().unwrap()]);
    let name = dev.trim_start_matches("/dev/");
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap();
    let result = async {
        assert_eq!(dio.trim(), "1", "direct I/O on the loop device");
        let f = open_direct(std::path::Path::new(&dev), true).unwrap();
        write_blocks(&f, 0, 256, 1).unwrap();
        // Another node reads what went through the loop device, FUSE and NBD.
        let ctx_b = publish(&d, &id, "node-b").await;
        let mut b = connect(&ctx_b).await.unwrap();
        let mut expected = vec![1u64; 256];
        let bytes = b.read(0, 256 * 4096).await.unwrap();
        let image = d.data_dir().join("volumes").join(format!("{id}.img"));
        assert_eq!(&std::fs::read(&image).unwrap()[..256 * 4096], &bytes[..]);
        // And node A reads B's writes, not a cached copy.
        let mut block = vec![0u8; 4096];
        handoff_csi::datacheck::fill_block(&mut block, 7, 2);
        b.write(7 * 4096, &block, true).await.unwrap();
        expected[7] = 2;
        verify_blocks(&f, &expected).unwrap();
    }
    .await;
    losetup(&["-d", &dev]);
    let _ = nix::mount::umount2(mnt.path(), nix::mount::MntFlags::MNT_DETACH);
    let status = tokio::time::timeout(Duration::from_secs(10), client.wait())
        .await
        .expect("nbd-client exits once unmounted")
        .unwrap();
    assert!(status.success(), "{status}");
    result
}

#[tokio::test]
async fn a_device_that_cannot_be_read_is_never_formatted() {
    if !require_root("a_device_that_cannot_be_read_is_never_formatted") {
        return;
    }
    use handoff_csi::node::command::CommandRunner;
    use handoff_csi::node::mount::{MountError, Mounter, SysMounter};
    let (d, _) = nbd_driver().await;
    let id = rwx_volume(&d, "nbd-unreadable", 8 * MIB).await;
    let ctx = publish(&d, &id, "node-a").await;
    let mnt = tempfile::Builder::new()
        .prefix("handoff-test-nbd")
        .tempdir()
        .unwrap();
    let mut client = start_nbd_client(&ctx, mnt.path()).await;
    let disk = mnt.path().join("disk");
    let dev = losetup(&["--direct-io=on", "--show", "-f", disk.to_str().unwrap()]);
    // The node loses the volume (fenced): every read of its device now fails.
    unpublish(&d, &id, "node-a").await;
    let blkid = Command::new("blkid").args(["-p", &dev]).status().unwrap();
    let probed = SysMounter::new(CommandRunner::new(Duration::from_secs(30)))
        .probe(std::path::Path::new(&dev))
        .await;
    losetup(&["-d", &dev]);
    let _ = nix::mount::umount2(mnt.path(), nix::mount::MntFlags::MNT_DETACH);
    let _ = tokio::time::timeout(Duration::from_secs(10), client.wait()).await;
    eprintln!("blkid -p on the unreadable device exited with {blkid}");
    assert!(
        matches!(probed, Err(MountError::Unreadable { .. })),
        "an unreadable device must not look empty: {probed:?}"
    );
}

/// Grants "fuzz"-style single export while `valid` holds.
struct Revocable(std::path::PathBuf, Arc<std::sync::atomic::AtomicBool>);

#[async_trait]
impl ExportAuthority for Revocable {
    async fn authorize(&self, name: &str) -> Result<Grant, Refusal> {
        OneExport(self.0.clone()).authorize(name).await
    }
    async fn still_valid(&self, _grant: &Grant) -> bool {
        self.1.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_connection_whose_attachment_vanished_elsewhere_is_dropped() {
    // Another replica served the ControllerUnpublish: this target did not fence, but
    // its periodic re-check drops the connection.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    let valid = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let target = NbdTarget::new(Arc::new(Revocable(image, valid.clone())));
    tokio::spawn(target.clone().serve(listener, std::future::pending()));
    let _recheck = target.spawn_revalidation(Duration::from_millis(100));
    let mut c = NbdClient::connect(&addr, "fuzz").await.unwrap();
    c.write(0, &[1u8; 512], false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write(0, &[2u8; 512], false).await.unwrap();
    valid.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(c.write(0, &[3u8; 512], false).await.is_err());
}

/// POSTs `body` to `addr/fence`; returns the status code.
async fn post_fence(addr: &str, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /fence HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_target_on_a_storage_host_is_fenced_over_signed_http() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("nbd-export.key");
    handoff_csi::nbd::target::authority::ExportKey::load_or_create(&key_file).unwrap();
    let (nbd_port, fence_port) = (free_port(), free_port());
    let fence_addr = format!("127.0.0.1:{fence_port}");
    let d = Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec![
            "--nbd-target".into(),
            fence_addr.clone(),
            "--nbd-advertise".into(),
            format!("127.0.0.1:{nbd_port}"),
            "--nbd-key-file".into(),
            key_file.display().to_string(),
        ],
        ..Default::default()
    })
    .await;
    let start_target = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
            .arg("target")
            .args(["--listen", &format!("127.0.0.1:{nbd_port}")])
            .args(["--fence-listen", &fence_addr])
            .arg("--data-dir")
            .arg(d.data_dir())
            .arg("--state-dir")
            .arg(d.state_dir())
            .arg("--nbd-key-file")
            .arg(&key_file)
            .env("HANDOFF_LOG_LEVEL", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut target = start_target();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&fence_addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let id = rwx_volume(&d, "nbd-remote", 4 * MIB).await;
    let ctx_a = publish(&d, &id, "node-a").await;
    let mut a = connect(&ctx_a).await.unwrap();
    a.write(0, &[7u8; 4096], true).await.unwrap();
    let ctx_b = publish(&d, &id, "node-b").await;
    let mut b = connect(&ctx_b).await.unwrap();

    // A fence request without the key's signature is refused and changes nothing.
    let now = chrono::Utc::now();
    let forged = format!(
        r#"{{"volume":"{id}","node":"node-b","at":{},"nonce":"n1","token":"{}"}}"#,
        now.timestamp_nanos_opt().unwrap(),
        "0".repeat(64)
    );
    assert_eq!(post_fence(&fence_addr, &forged).await, 403);
    b.write(4096, &[8u8; 4096], true).await.unwrap();
    // Issue 15 case 15: a signed request is accepted once; replayed, or far from the
    // target's clock, it is refused.
    let key = handoff_csi::nbd::target::authority::ExportKey::load(&key_file).unwrap();
    let vid = handoff_csi::ids::VolumeId::parse(&id).unwrap();
    let c = handoff_csi::ids::NodeId::parse("node-c").unwrap();
    let signed = |at: chrono::DateTime<chrono::Utc>, nonce: &str| {
        format!(
            r#"{{"volume":"{id}","node":"node-c","at":{},"nonce":"{nonce}","token":"{}"}}"#,
            at.timestamp_nanos_opt().unwrap(),
            key.fence_token(&vid, &c, at, nonce)
        )
    };
    let genuine = signed(now, "nonce-1");
    assert_eq!(post_fence(&fence_addr, &genuine).await, 200);
    assert_eq!(post_fence(&fence_addr, &genuine).await, 403, "replayed");
    let old = now - chrono::Duration::seconds(600);
    assert_eq!(
        post_fence(&fence_addr, &signed(old, "nonce-2")).await,
        403,
        "stale"
    );
    b.write(4096, &[8u8; 4096], true).await.unwrap();

    // The controller fences A at the remote target before its ControllerUnpublish is OK.
    unpublish(&d, &id, "node-a").await;
    assert!(a.write(0, &[9u8; 4096], true).await.is_err());
    assert!(matches!(
        connect(&ctx_a).await,
        Err(ClientError::Refused { .. })
    ));
    assert_eq!(b.read(0, 4096).await.unwrap(), vec![7u8; 4096]);

    // With the target unreachable, a detach is not OK (it cannot be fenced) — and it
    // succeeds on retry once the target is back.
    target.kill().await.unwrap();
    let status = d
        .controller()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Volumes on the file plane have nothing to fence: their detach does not need it.
    let plain = d
        .controller()
        .await
        .create_volume(create_request(
            "file-plane",
            MIB,
            block_cap(Mode::MultiNodeMultiWriter),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    publish(&d, &plain, "node-c").await;
    unpublish(&d, &plain, "node-c").await;
    let _target = start_target();
    let mut ok = false;
    for _ in 0..100 {
        if d.controller()
            .await
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: "node-b".into(),
                ..Default::default()
            })
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the retried detach succeeds once the target answers");
}
