//! The `file` backend on a real kernel NFS server (Debian's 6.1 under QEMU, see
//! support/kernel_lab.rs), as docs/install.md tells people to deploy it, and the
//! refusal of a data dir without O_DIRECT. Each `guest_*` test runs inside the guest;
//! the host test boots it once and runs them.

mod support;

use std::path::Path;
use std::time::Duration;

use handoff_csi::csi;
use support::kernel_lab::{in_lab, Lab};
use support::lab_steps::*;
use support::*;

#[test]
fn file_backend_on_nfs_on_a_real_kernel() {
    if std::env::var("HANDOFF_SKIP_KERNEL_LAB").as_deref() == Ok("1") {
        eprintln!("SKIPPED file_backend_on_nfs_on_a_real_kernel: HANDOFF_SKIP_KERNEL_LAB=1");
        return;
    }
    let lab = Lab::prepare().unwrap_or_else(|e| {
        panic!(
            "the kernel lab cannot run: {e} (HANDOFF_SKIP_KERNEL_LAB=1 skips it on a workstation)"
        )
    });
    let tests = [
        "guest_file_backend_on_nfs_migrates_without_stale_blocks",
        "guest_a_data_dir_without_o_direct_is_refused_at_stage",
    ];
    let run = lab
        .run_tests("nfs", &tests, Duration::from_secs(600))
        .expect("lab boots");
    eprintln!(
        "kernel lab (nfs): guest ran {:?} (TCG; lab timing only)",
        run.elapsed
    );
    assert_eq!(run.exit, Some(0), "guest log:\n{}", run.log);
    assert_eq!(passed(&run.log), tests.len(), "{}", run.log);
    for line in run.log.lines().filter(|l| l.starts_with("lab: ")) {
        eprintln!("{line}");
    }
}

/// The file backend on NFS as docs/install.md deploys it: a kernel NFS server exports
/// the data dir, node A and node B each see it through a mount of their own (separate
/// superblocks and caches, as on two machines), and a live migration A→B reads back
/// every block A wrote last, nothing stale. Then an RWO hand-off the same way.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (file_backend_on_nfs_on_a_real_kernel boots it)"]
async fn guest_file_backend_on_nfs_migrates_without_stale_blocks() {
    assert!(in_lab(), "a guest half of the kernel lab");
    use handoff_csi::datacheck;
    sh("mkdir -p /srv/nfs /proc/fs/nfsd && mount -t nfsd nfsd /proc/fs/nfsd");
    sh("rpcbind -w || rpcbind");
    sh("exportfs -o rw,no_root_squash,insecure,no_subtree_check,fsid=0 127.0.0.1:/srv/nfs");
    // NFSv4's grace period after a server start (90 s) would stall the first opens.
    sh("echo 10 > /proc/fs/nfsd/nfsv4leasetime && echo 10 > /proc/fs/nfsd/nfsv4gracetime");
    sh("rpc.mountd -N 3");
    sh("rpc.nfsd -N 3 -p 2049 4");
    let data = Path::new("/mnt/shared-data");
    let opts = "vers=4.2,addr=127.0.0.1,nosharecache,hard".to_owned();
    sh(&format!(
        "mkdir -p {0} && mount -t nfs4 -o {opts} 127.0.0.1:/ {0}",
        data.display()
    ));
    let a = Driver::start_with(DriverOptions {
        data_dir: Some(data.to_path_buf()),
        ..Default::default()
    })
    .await;
    let b = Driver::start_with(DriverOptions {
        mode: "node",
        node_id: "node-b".into(),
        data_dir: Some(data.to_path_buf()),
        own_nfs_mount: Some(("127.0.0.1:/".into(), data.to_path_buf(), opts.clone())),
        ..Default::default()
    })
    .await;
    let mut c = a.controller().await;
    for (cap, name, dual) in [(rwx(), "nfs-rwx", true), (rwo_block(), "nfs-rwo", false)] {
        let v = c
            .create_volume(create_request(name, 8 << 20, cap.clone()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let blocks = (8u64 << 20) / datacheck::BLOCK as u64;
        let on_a = attach_to(&a, &a, "node-a", &v.volume_id, &cap, name).await;
        let dev = datacheck::open_direct(&on_a.1, true).unwrap();
        datacheck::write_blocks(&dev, 0, blocks, 1).unwrap();
        let dirty = blocks / 4;
        let on_b = if dual {
            // Live migration: B attaches while A still writes.
            let on_b = attach_to(&a, &b, "node-b", &v.volume_id, &cap, name).await;
            datacheck::write_blocks(&dev, 0, dirty, 2).unwrap();
            drop(dev);
            detach_from(&a, &a, "node-a", &v.volume_id, on_a).await;
            on_b
        } else {
            // RWO: A lets go first, then B.
            datacheck::write_blocks(&dev, 0, dirty, 2).unwrap();
            drop(dev);
            detach_from(&a, &a, "node-a", &v.volume_id, on_a).await;
            attach_to(&a, &b, "node-b", &v.volume_id, &cap, name).await
        };
        let mut expected = vec![1u64; blocks as usize];
        expected[..dirty as usize].fill(2);
        // B's device is bind-mounted in B's own mount namespace: reach it through B.
        let b_view =
            Path::new(&format!("/proc/{}/root", b.pid())).join(on_b.1.strip_prefix("/").unwrap());
        let dev_b = datacheck::open_direct(&b_view, true).unwrap();
        let verified = datacheck::verify_blocks(&dev_b, &expected)
            .unwrap_or_else(|e| panic!("{name}: stale or lost on node-b: {e}"));
        assert_eq!(verified as u64, blocks);
        drop(dev_b);
        detach_from(&a, &b, "node-b", &v.volume_id, on_b).await;
        eprintln!("lab: {name} on NFS: {verified} blocks verified on node-b");
    }
}

/// A data dir whose filesystem cannot do O_DIRECT (tmpfs here; some NFS or FUSE mounts
/// in the field) is refused at NodeStage with FailedPrecondition, saying why: a loop
/// device without direct I/O would serve the other node's writes from a stale page cache.
///
/// On the kernel lab's 6.1: tmpfs gained O_DIRECT in 6.6, so newer hosts cannot show it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel lab guest (file_backend_on_nfs_on_a_real_kernel boots it)"]
async fn guest_a_data_dir_without_o_direct_is_refused_at_stage() {
    assert!(in_lab(), "a guest half of the kernel lab");
    let mnt = tempfile::Builder::new()
        .prefix("handoff-test-tmpfs-")
        .tempdir()
        .unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        mnt.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64m"),
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let d = Driver::start_with(DriverOptions {
        data_dir: Some(mnt.path().join("data")),
        ..Default::default()
    })
    .await;
    let cap = rwo_block();
    let id = d
        .controller()
        .await
        .create_volume(create_request("no-dio", 8 << 20, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let ctx = d
        .controller()
        .await
        .controller_publish_volume(publish_request(&id, "node-a", cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let staging = d.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let err = d
        .node()
        .await
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            publish_context: ctx,
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().to_lowercase().contains("direct i/o"),
        "{}",
        err.message()
    );
    drop(d);
}
