//! Seeded fuzzing at the gRPC boundary: thousands of requests built from hostile
//! pieces (path traversal, NUL, control characters, huge strings, unicode, negative and
//! overflowing sizes, foreign ids) against every RPC. Each must get a deliberate status
//! code, the driver must stay up, and nothing may appear outside its data and state dirs.
//! HANDOFF_FUZZ_ITERATIONS=N runs longer (default 1500); HANDOFF_FUZZ_SEED picks the seed.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use support::*;
use tonic::Code;

fn hostile_string(r: &mut Rng, valid: &[String]) -> String {
    let pieces: Vec<String> = vec![
        String::new(),
        "../../../../etc/passwd".into(),
        "/etc/shadow".into(),
        "vol-../../x".into(),
        "a\0b".into(),
        "\u{7}\u{1b}[2J".into(),
        "ünïcødé-名前-🙂".into(),
        "x".repeat(129),
        "y".repeat(10_000),
        format!("vol-{}", "f".repeat(32)),
        format!("snap-{}", "0".repeat(32)),
        format!("vol-{}", "F".repeat(32)),
        "some-vol-id".into(),
        ".hidden".into(),
        "node-a".into(),
        " ".into(),
        "%2e%2e%2f".into(),
    ];
    if !valid.is_empty() && r.next() % 4 == 0 {
        return r.pick(valid).clone();
    }
    let mut s = r.pick(&pieces).clone();
    if r.next() % 3 == 0 {
        let extra = r.pick(&pieces).clone();
        s.push_str(&extra);
    }
    s
}

fn hostile_path(r: &mut Rng, sandbox: &Path) -> String {
    let choices = [
        String::new(),
        "relative/path".into(),
        "/etc".into(),
        "/".into(),
        format!("{}/../../etc", sandbox.display()),
        format!("{}/ok\0evil", sandbox.display()),
        format!("{}/{}", sandbox.display(), "z".repeat(5000)),
        format!("{}/target", sandbox.display()),
    ];
    r.pick(&choices).clone()
}

fn size(r: &mut Rng) -> i64 {
    *r.pick(&[
        0,
        1,
        -1,
        i64::MIN,
        i64::MAX,
        1 << 20,
        (1 << 20) + 1,
        1 << 62,
        4095,
    ])
}

fn capability(r: &mut Rng) -> Option<csi::VolumeCapability> {
    let mode = *r.pick(&[0, 1, 2, 3, 4, 5, 6, 7, 99, -3]);
    let access_type = match r.next() % 4 {
        0 => None,
        1 => Some(csi::volume_capability::AccessType::Block(Default::default())),
        _ => Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: r.pick(&["", "ext4", "xfs", "ntfs", "../x"]).to_string(),
                mount_flags: r
                    .pick(&[
                        vec![],
                        vec!["ro".to_string()],
                        vec!["bind".to_string()],
                        vec!["a,b".to_string()],
                        vec!["x".repeat(5000)],
                    ])
                    .clone(),
                volume_mount_group: r.pick(&["", "1000"]).to_string(),
            },
        )),
    };
    (r.next() % 6 != 0).then_some(csi::VolumeCapability {
        access_type,
        access_mode: (r.next() % 5 != 0).then_some(csi::volume_capability::AccessMode { mode }),
    })
}

fn params(r: &mut Rng) -> HashMap<String, String> {
    let mut p = HashMap::new();
    for _ in 0..(r.next() % 3) {
        let k = r
            .pick(&[
                "migrationTimeoutSeconds",
                "csi.storage.k8s.io/pvc/name",
                "typo",
                "\0",
                "",
            ])
            .to_string();
        let v = r
            .pick(&["300", "29", "3601", "-5", "abc", "99999999999999999999", ""])
            .to_string();
        p.insert(k, v);
    }
    p
}

/// Every file and directory under `root`, for "nothing touched outside" checks.
fn tree(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.insert(p.display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn hostile_requests_get_deliberate_codes_and_touch_nothing_outside() {
    let iterations: usize = std::env::var("HANDOFF_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = std::env::var("HANDOFF_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let d = Driver::start().await;
    let sandbox = d.path("sandbox");
    std::fs::create_dir_all(&sandbox).unwrap();
    let (mut c, mut n) = (d.controller().await, d.node().await);

    // A few real objects so some requests hit existing state.
    let mut valid = Vec::new();
    for i in 0..3 {
        let v = c
            .create_volume(create_request(
                &format!("real-{i}"),
                1 << 20,
                block_cap(Mode::SingleNodeWriter),
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        valid.push(v.volume_id);
    }
    let before_outside = tree(Path::new("/etc")).len();
    let before_dir: BTreeSet<String> = tree(d.dir.path());

    let allowed = [
        Code::Ok,
        Code::InvalidArgument,
        Code::NotFound,
        Code::AlreadyExists,
        Code::OutOfRange,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::ResourceExhausted,
    ];
    let mut rng = Rng::new(seed);
    let mut counts: HashMap<Code, usize> = HashMap::new();
    for i in 0..iterations {
        let r = &mut rng;
        let code = match r.next() % 12 {
            0 => c
                .create_volume(csi::CreateVolumeRequest {
                    name: hostile_string(r, &[]),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size(r),
                        limit_bytes: size(r),
                    }),
                    volume_capabilities: capability(r).into_iter().collect(),
                    parameters: params(r),
                    ..Default::default()
                })
                .await
                .map(drop),
            1 => c
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: hostile_string(r, &[]),
                    ..Default::default()
                })
                .await
                .map(drop),
            2 => c
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: hostile_string(r, &valid),
                    node_id: hostile_string(r, &[]),
                    volume_capability: capability(r),
                    readonly: r.next() % 2 == 0,
                    ..Default::default()
                })
                .await
                .map(drop),
            3 => c
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: hostile_string(r, &valid),
                    node_id: hostile_string(r, &[]),
                    ..Default::default()
                })
                .await
                .map(drop),
            4 => c
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: hostile_string(r, &valid),
                    volume_capabilities: capability(r).into_iter().collect(),
                    ..Default::default()
                })
                .await
                .map(drop),
            5 => c
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: hostile_string(r, &valid),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size(r),
                        limit_bytes: size(r),
                    }),
                    ..Default::default()
                })
                .await
                .map(drop),
            6 => c
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: hostile_string(r, &valid),
                    name: hostile_string(r, &[]),
                    parameters: params(r),
                    ..Default::default()
                })
                .await
                .map(drop),
            7 => c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: *r.pick(&[-1, 0, 1, i32::MAX]),
                    starting_token: hostile_string(r, &valid),
                })
                .await
                .map(drop),
            8 => n
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: hostile_string(r, &[]),
                    staging_target_path: hostile_path(r, &sandbox),
                    volume_capability: capability(r),
                    publish_context: HashMap::from([
                        (
                            "transport".into(),
                            r.pick(&["loop", "nvme", ""]).to_string(),
                        ),
                        ("imagePath".into(), hostile_path(r, &sandbox)),
                    ]),
                    ..Default::default()
                })
                .await
                .map(drop),
            9 => n
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: hostile_string(r, &[]),
                    staging_target_path: hostile_path(r, &sandbox),
                    target_path: hostile_path(r, &sandbox),
                    volume_capability: capability(r),
                    ..Default::default()
                })
                .await
                .map(drop),
            10 => n
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: hostile_string(r, &[]),
                    target_path: hostile_path(r, &sandbox),
                })
                .await
                .map(drop),
            _ => n
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: hostile_string(r, &[]),
                    volume_path: hostile_path(r, &sandbox),
                    ..Default::default()
                })
                .await
                .map(drop),
        };
        let (code, message) = code.map_or_else(
            |s| (s.code(), s.message().to_owned()),
            |()| (Code::Ok, String::new()),
        );
        assert!(
            allowed.contains(&code),
            "iteration {i} (seed {seed}): unexpected {code:?}: {message}"
        );
        *counts.entry(code).or_default() += 1;
    }
    eprintln!("fuzz: {iterations} requests, seed {seed}: {counts:?}");
    assert!(
        counts[&Code::InvalidArgument] > iterations / 10,
        "most hostile input is refused as invalid"
    );

    // Still serving, and nothing written outside the data/state dirs and the sandbox.
    d.identity()
        .await
        .probe(csi::ProbeRequest {})
        .await
        .unwrap();
    assert_eq!(tree(Path::new("/etc")).len(), before_outside);
    let root = d.dir.path().display().to_string();
    let inside = |p: &String| {
        [d.data_dir(), d.state_dir(), sandbox.clone()]
            .iter()
            .any(|dir| p.starts_with(&dir.display().to_string()))
    };
    let new: Vec<_> = tree(d.dir.path())
        .difference(&before_dir)
        .filter(|p| !inside(p))
        .cloned()
        .collect();
    assert!(
        new.is_empty(),
        "files appeared outside {root}/{{data,state,sandbox}}: {new:?}"
    );
}

/// Detaches every mount under a test directory, also when the test fails midway.
struct UnmountUnder(std::path::PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(&self.0))
            .collect();
        under.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in under {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A path checked against the kubelet dir can change before the mount syscall (a
/// component swapped for a symlink). The node's mounter opens every path under the
/// kubelet dir beneath it and mounts through that descriptor: a target or bind source
/// that now leads outside is refused and nothing is mounted there; a symlink that stays
/// inside still works; a read-only bind is proven read-only.
#[tokio::test]
async fn a_path_swapped_for_a_symlink_after_the_check_is_not_mounted_through() {
    if !require_root("a_path_swapped_for_a_symlink_after_the_check_is_not_mounted_through") {
        return;
    }
    use handoff_csi::node::command::CommandRunner;
    use handoff_csi::node::mount::{MountError, Mounter, SysMounter};
    let dir = tempfile::Builder::new()
        .prefix("handoff-test-confine")
        .tempdir()
        .unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let _cleanup = UnmountUnder(base.clone());
    let root = base.join("kubelet");
    let outside = base.join("outside");
    for d in [
        root.join("staging"),
        root.join("real/pod/mount"),
        root.join("ro/mount"),
        outside.join("pod/mount"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(root.join("staging/data"), b"volume").unwrap();
    std::fs::write(outside.join("secret"), b"host").unwrap();
    let mounted = |p: &Path| {
        let p = std::fs::canonicalize(p).unwrap_or(p.to_path_buf());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
    };
    let m =
        SysMounter::new(CommandRunner::new(std::time::Duration::from_secs(30))).confined_to(&root);

    // The target's parent became a symlink out of the kubelet dir.
    std::os::unix::fs::symlink(&outside, root.join("pods")).unwrap();
    let escaped = m
        .bind(&root.join("staging"), &root.join("pods/pod/mount"), false)
        .await
        .unwrap_err();
    assert!(
        matches!(escaped, MountError::OutsideRoot { .. }),
        "{escaped}"
    );
    assert!(
        !mounted(&outside.join("pod/mount")),
        "nothing mounted outside"
    );
    // The bind source became a symlink to a host directory.
    std::os::unix::fs::symlink(&outside, root.join("staging-swapped")).unwrap();
    let exposed = m
        .bind(
            &root.join("staging-swapped"),
            &root.join("real/pod/mount"),
            false,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(exposed, MountError::OutsideRoot { .. }),
        "{exposed}"
    );
    assert!(!mounted(&root.join("real/pod/mount")));
    assert!(!root.join("real/pod/mount/secret").exists());

    // A relative symlink that stays inside is followed.
    std::os::unix::fs::symlink("real", root.join("inside")).unwrap();
    m.bind(&root.join("staging"), &root.join("inside/pod/mount"), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(root.join("real/pod/mount/data")).unwrap(),
        b"volume"
    );
    m.unmount(&root.join("real/pod/mount")).await.unwrap();

    // Read-only binds are remounted read-only and proven so.
    m.bind(&root.join("staging"), &root.join("ro/mount"), true)
        .await
        .unwrap();
    let vfs = nix::sys::statvfs::statvfs(&root.join("ro/mount")).unwrap();
    assert!(vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    assert!(std::fs::write(root.join("ro/mount/data"), b"x").is_err());
    m.unmount(&root.join("ro/mount")).await.unwrap();
    assert!(!mounted(&root.join("ro/mount")));
    m.remove_mount_point(&root.join("ro/mount")).await.unwrap();
    assert!(!root.join("ro/mount").exists());

    // Teardown through a swapped parent touches nothing outside: a host mount stays
    // mounted, a host file stays.
    nix::mount::mount(
        Some(&outside),
        &outside.join("pod/mount"),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let kept = m.unmount(&root.join("pods/pod/mount")).await.unwrap_err();
    assert!(matches!(kept, MountError::OutsideRoot { .. }), "{kept}");
    assert!(
        mounted(&outside.join("pod/mount")),
        "the host's mount stays"
    );
    let kept = m
        .remove_mount_point(&root.join("pods/secret"))
        .await
        .unwrap_err();
    assert!(matches!(kept, MountError::OutsideRoot { .. }), "{kept}");
    assert!(outside.join("secret").exists(), "the host's file stays");
    // Creating a mount point through a swapped parent creates nothing outside.
    let kept = m.make_dir(&root.join("pods/new/mount")).await.unwrap_err();
    assert!(matches!(kept, MountError::OutsideRoot { .. }), "{kept}");
    assert!(!outside.join("new").exists());
    let kept = m.make_file(&root.join("pods/device")).await.unwrap_err();
    assert!(matches!(kept, MountError::OutsideRoot { .. }), "{kept}");
    assert!(!outside.join("device").exists());
    m.make_dir(&root.join("inside/new/mount")).await.unwrap();
    assert!(root.join("real/new/mount").is_dir());
    m.make_file(&root.join("real/new/device")).await.unwrap();
    m.make_file(&root.join("real/new/device")).await.unwrap();
    assert!(root.join("real/new/device").is_file());
    // Already gone is still fine (idempotent teardown).
    m.remove_mount_point(&root.join("gone/mount"))
        .await
        .unwrap();
    m.unmount(&root.join("gone/mount")).await.unwrap();
}
