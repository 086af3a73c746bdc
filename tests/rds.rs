//! The `rds` backend over real SSH against a fake RouterOS: the exact commands, parsing
//! of what RouterOS prints, retry classes, host-key pinning, serialised sessions, and
//! adoption of volumes made by the Go driver.

mod support;

use std::sync::Arc;
use std::time::Duration;

use handoff_csi::backend::rds::{RdsBackend, RdsSettings};
use handoff_csi::backend::ssh::{Credentials, HostKeyPolicy, SshShell, SshTarget};
use handoff_csi::backend::{
    Backend, BackendError, CapacityRange, ContentSource, CreateSnapshot, CreateVolume, Fencing,
    StoredCapability, MIB,
};
use handoff_csi::capability::AccessMode;
use handoff_csi::export::ExportInfo;
use handoff_csi::ids::{NodeId, VolumeId, VolumeName};
use support::routeros::{FakeRouter, PASSWORD, USER};

const GIB: u64 = 1 << 30;
const DIR: &str = "/nvme1/volumes";
const GO_VOLUME: &str = "pvc-3c6f1a2b-1111-4222-8333-944455556666";

fn target(router: &FakeRouter, host_key: HostKeyPolicy, credentials: Credentials) -> SshTarget {
    SshTarget {
        address: router.addr.to_string(),
        user: USER.into(),
        credentials,
        host_key,
        timeout: Duration::from_secs(5),
    }
}

fn pinned(router: &FakeRouter) -> HostKeyPolicy {
    HostKeyPolicy::Pinned(vec![router.host_key_line().parse().unwrap()])
}

fn backend_with(
    router: &FakeRouter,
    host_key: HostKeyPolicy,
    credentials: Credentials,
) -> RdsBackend {
    RdsBackend::new(
        Arc::new(SshShell::new(target(router, host_key, credentials))),
        RdsSettings {
            volume_dir: DIR.into(),
            nvme_address: "10.0.0.9".into(),
            nvme_port: 4420,
            attempts: 3,
            backoff: Duration::from_millis(5),
        },
    )
}

fn backend(router: &FakeRouter) -> RdsBackend {
    backend_with(
        router,
        pinned(router),
        Credentials::KeyFile(router.client_key_file.clone()),
    )
}

fn request(name: &str, size: u64) -> CreateVolume {
    CreateVolume {
        name: VolumeName::parse(name).unwrap(),
        capacity: CapacityRange {
            required: size,
            limit: 0,
        },
        capabilities: vec![StoredCapability {
            mode: AccessMode::MultiNodeMultiWriter,
            block: true,
        }],
        parameters: Default::default(),
        source: None,
        source_in_use: false,
    }
}

#[tokio::test]
async fn create_export_grow_and_delete_with_exact_commands() {
    let router = FakeRouter::start(100 * GIB).await;
    let b = backend(&router);
    let name = "pvc-0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3";
    let v = b.create_volume(&request(name, 10 * GIB)).await.unwrap();
    assert_eq!(
        v.id.as_str(),
        name,
        "PV names are the volume ids, as in the Go driver"
    );
    assert_eq!(v.capacity_bytes, 10 * GIB);
    let cmds = router.take_commands();
    let add = cmds
        .iter()
        .find(|c| c.starts_with("/disk add"))
        .expect("a /disk add");
    let expected = format!(
        "/disk add type=file file-path=\"{DIR}/{name}.img\" file-size={} slot=\"{name}\" mount-filesystem=no nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=\"nqn.2000-02.com.mikrotik:{name}\" nvme-tcp-server-allow-host-name=\"nqn.2014-08.dev.handoff-csi:no-host\" comment=\"handoff2:",
        10 * GIB
    );
    assert!(add.starts_with(&expected), "{add}");
    assert_eq!(
        cmds.first().unwrap(),
        &format!("/disk print detail where slot=\"{name}\""),
        "looks before it creates"
    );

    // Again with the same name: the same volume, nothing added.
    let again = b.create_volume(&request(name, 10 * GIB)).await.unwrap();
    assert_eq!(again, v);
    assert!(router
        .take_commands()
        .iter()
        .all(|c| !c.starts_with("/disk add")));
    // Same name, other size: a conflict naming the difference.
    let err = b.create_volume(&request(name, 20 * GIB)).await.unwrap_err();
    assert!(matches!(err, BackendError::NameConflict { .. }), "{err}");

    let node = NodeId::parse("node-a").unwrap();
    let e = b.export(&v, &node).await.unwrap();
    assert_eq!(
        e,
        ExportInfo::NvmeTcp {
            address: "10.0.0.9".into(),
            port: 4420,
            subsystem_nqn: format!("nqn.2000-02.com.mikrotik:{name}"),
            namespace_uuid: String::new(),
            ctrl_loss_tmo: 600,
            host_nqn: Some(handoff_csi::export::node_host_nqn(&node)),
        }
    );
    assert_eq!(
        b.fencing(),
        Fencing::Target,
        "RouterOS's per-disk host allow list"
    );

    // Grow (exact size kept in the comment though RouterOS prints 10.5GiB).
    let grown = b.expand_volume(&v.id, 10 * GIB + 512 * MIB).await.unwrap();
    assert_eq!(grown.capacity_bytes, 10 * GIB + 512 * MIB);
    let set = router
        .take_commands()
        .into_iter()
        .find(|c| c.starts_with("/disk set"))
        .unwrap();
    assert!(
        set.starts_with(&format!(
            "/disk set [find slot=\"{name}\"] file-size={} comment=",
            10 * GIB + 512 * MIB
        )),
        "{set}"
    );
    assert_eq!(
        b.get_volume(&v.id).await.unwrap().unwrap().capacity_bytes,
        10 * GIB + 512 * MIB
    );
    let err = b.expand_volume(&v.id, GIB).await.unwrap_err();
    assert!(matches!(err, BackendError::Shrink { .. }), "{err}");

    b.delete_volume(&v.id).await.unwrap();
    let cmds = router.take_commands();
    assert_eq!(
        &cmds[cmds.len() - 2..],
        [
            format!("/disk remove [find slot=\"{name}\"]"),
            format!("/file remove [find name=\"nvme1/volumes/{name}.img\"]"),
        ]
    );
    assert!(router.disk(name).is_none());
    assert!(router.state.lock().files.is_empty());
    // Idempotent: deleting again succeeds and changes nothing.
    b.delete_volume(&v.id).await.unwrap();
    assert!(b.get_volume(&v.id).await.unwrap().is_none());
}

#[tokio::test]
async fn other_names_get_ids_and_are_found_again_by_name() {
    let router = FakeRouter::start(100 * GIB).await;
    let b = backend(&router);
    let v = b
        .create_volume(&request("sanity-volume-1", 8 * MIB))
        .await
        .unwrap();
    assert!(v.id.as_str().starts_with("vol-"));
    assert_eq!(v.name, "sanity-volume-1");
    let again = b
        .create_volume(&request("sanity-volume-1", 8 * MIB))
        .await
        .unwrap();
    assert_eq!(again.id, v.id);
    assert_eq!(b.list_volumes().await.unwrap(), vec![v]);
}

#[tokio::test]
async fn snapshots_and_restores_copy_on_the_router() {
    let router = FakeRouter::start(100 * GIB).await;
    let b = backend(&router);
    let v = b.create_volume(&request("disk-a", GIB)).await.unwrap();
    router.take_commands();
    let snap = b
        .create_snapshot(&CreateSnapshot {
            name: VolumeName::parse("snap-a").unwrap(),
            source: v.id.clone(),
            source_in_use: true,
        })
        .await
        .unwrap();
    assert_eq!(snap.size_bytes, GIB);
    let add = router
        .take_commands()
        .into_iter()
        .find(|c| c.starts_with("/disk add"))
        .unwrap();
    assert!(
        add.starts_with(&format!(
            "/disk add type=file copy-from=[find slot=\"{}\"] file-path=\"{DIR}/{}.img\" slot=\"{}\" mount-filesystem=no comment=",
            v.id, snap.id, snap.id
        )),
        "{add}"
    );
    assert!(
        !add.contains("nvme-tcp-export"),
        "snapshots are not exported"
    );
    // Idempotent by name and source.
    let again = b
        .create_snapshot(&CreateSnapshot {
            name: VolumeName::parse("snap-a").unwrap(),
            source: v.id.clone(),
            source_in_use: false,
        })
        .await
        .unwrap();
    assert_eq!(again, snap);
    assert_eq!(b.list_snapshots().await.unwrap(), vec![snap.clone()]);
    assert!(b.list_volumes().await.unwrap().iter().all(|x| x.id == v.id));

    // Restore into a larger volume: one copy, as large as asked.
    let mut req = request("restored", 2 * GIB);
    req.source = Some(ContentSource::Snapshot(snap.id.clone()));
    let r = b.create_volume(&req).await.unwrap();
    assert_eq!(r.capacity_bytes, 2 * GIB);
    assert_eq!(r.source, req.source);
    let cmds = router.take_commands();
    let add = cmds.iter().find(|c| c.starts_with("/disk add")).unwrap();
    assert!(
        add.contains(&format!("copy-from=[find slot=\"{}\"]", snap.id))
            && add.contains(&format!(" file-size={} ", 2 * GIB)),
        "{add}"
    );
    assert!(add.contains("nvme-tcp-export=yes"), "{add}");
    assert_eq!(
        router.state.lock().files[&format!("nvme1/volumes/{}.img", r.id)],
        2 * GIB
    );
    // Smaller than the snapshot: refused before anything is sent.
    let mut small = request("too-small", 8 * MIB);
    small.source = Some(ContentSource::Snapshot(snap.id.clone()));
    let err = b.create_volume(&small).await.unwrap_err();
    assert!(
        matches!(err, BackendError::SmallerThanSource { .. }),
        "{err}"
    );

    b.delete_snapshot(&snap.id).await.unwrap();
    b.delete_snapshot(&snap.id).await.unwrap();
    assert!(b.list_snapshots().await.unwrap().is_empty());
}

#[tokio::test]
async fn transient_failures_are_retried_and_others_are_not() {
    let router = FakeRouter::start(100 * GIB).await;
    let b = backend(&router);
    // A busy router: the lookup is retried and the volume made.
    router.inject("failure: could not lock, try again later");
    let v = b.create_volume(&request("busy", 8 * MIB)).await.unwrap();
    let cmds = router.take_commands();
    assert_eq!(cmds[0], cmds[1], "the failed command was sent again");
    assert!(router.disk(v.id.as_str()).is_some());

    // Not enough space: ResourceExhausted at once, never retried.
    let err = b
        .create_volume(&request("huge", 200 * GIB))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::NoSpace(_)), "{err}");
    let adds = router
        .take_commands()
        .into_iter()
        .filter(|c| c.starts_with("/disk add"))
        .count();
    assert_eq!(adds, 1);

    // A syntax error (a RouterOS version that speaks differently) is not retried either.
    router.inject("expected end of command (line 1 column 40)");
    let err = b.get_volume(&v.id).await.unwrap_err();
    assert!(matches!(err, BackendError::TargetRefused(_)), "{err}");
    assert_eq!(router.take_commands().len(), 1);

    // Busy for longer than the attempts: Unavailable (Target), after exactly 3 tries.
    for _ in 0..3 {
        router.inject("failure: could not lock, try again later");
    }
    let err = b.get_volume(&v.id).await.unwrap_err();
    assert!(matches!(err, BackendError::Target(_)), "{err}");
    assert_eq!(router.take_commands().len(), 3);

    // A command that fails without a word (non-zero exit, no output) is a failure too.
    router.state.lock().silent_failures = 1;
    assert!(b.get_volume(&v.id).await.unwrap().is_some(), "retried");
    assert_eq!(router.take_commands().len(), 2);
    router.state.lock().silent_failures = 3;
    let err = b.get_volume(&v.id).await.unwrap_err();
    assert!(err.to_string().contains("exited with status 1"), "{err}");

    // Issue 15 case 17: a channel closed without an exit status is not a success, even
    // with output (partial); the command is retried, and fails when it keeps happening.
    router.take_commands();
    router.state.lock().cut_without_status = 1;
    assert!(b.get_volume(&v.id).await.unwrap().is_some(), "retried");
    assert_eq!(router.take_commands().len(), 2);
    router.state.lock().cut_without_status = 3;
    let err = b.get_volume(&v.id).await.unwrap_err();
    assert!(err.to_string().contains("without an exit status"), "{err}");
}

#[tokio::test]
async fn a_host_key_that_does_not_match_is_refused_before_login() {
    let router = FakeRouter::start(GIB).await;
    let impostor = FakeRouter::start_with_key(GIB, 99).await;
    // Pinned to the real router's key, talking to the impostor.
    let b = backend_with(
        &impostor,
        pinned(&router),
        Credentials::Password(PASSWORD.into()),
    );
    let err = b.probe().await.unwrap_err();
    assert!(matches!(err, BackendError::TargetRefused(_)), "{err}");
    assert!(
        err.to_string().contains(&impostor.host_fingerprint()),
        "{err}"
    );
    assert_eq!(
        impostor.state.lock().logins,
        0,
        "no credentials went to the impostor"
    );
    assert!(impostor.commands().is_empty());

    // A fingerprint pin works like a key pin.
    let by_fp = backend_with(
        &router,
        HostKeyPolicy::Pinned(vec![router.host_fingerprint().parse().unwrap()]),
        Credentials::Password(PASSWORD.into()),
    );
    by_fp.probe().await.unwrap();
    // Only the explicit insecure policy talks to an unknown key.
    let insecure = backend_with(
        &impostor,
        HostKeyPolicy::Insecure,
        Credentials::Password(PASSWORD.into()),
    );
    insecure.probe().await.unwrap();
}

#[tokio::test]
async fn an_unusable_private_key_is_not_retried() {
    let router = FakeRouter::start(GIB).await;
    let dir = tempfile::tempdir().unwrap();
    let bad = support::routeros::write_file(dir.path(), "key", "not a key");
    let b = backend_with(&router, pinned(&router), Credentials::KeyFile(bad));
    let err = b.probe().await.unwrap_err();
    assert!(matches!(err, BackendError::TargetRefused(_)), "{err}");
    assert!(err.to_string().contains("private key"), "{err}");
    assert_eq!(router.state.lock().logins, 0);
}

#[tokio::test]
async fn a_refused_login_is_not_retried() {
    let router = FakeRouter::start(GIB).await;
    let b = backend_with(
        &router,
        pinned(&router),
        Credentials::Password("wrong".into()),
    );
    let err = b.probe().await.unwrap_err();
    assert!(matches!(err, BackendError::TargetRefused(_)), "{err}");
    assert!(err.to_string().contains("refused the login"), "{err}");
    assert!(router.commands().is_empty());
}

#[tokio::test]
async fn commands_never_overlap_and_share_one_session() {
    let router = FakeRouter::start(100 * GIB).await;
    router.state.lock().delay = Duration::from_millis(5);
    let b = Arc::new(backend(&router));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                b.create_volume(&request(&format!("par-{i}"), 8 * MIB))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = router.state.lock();
    assert_eq!(s.max_in_flight, 1, "RouterOS sessions are serialised");
    assert_eq!(s.logins, 1, "one SSH session, reused");
}

#[tokio::test]
async fn volumes_of_the_go_driver_are_adopted() {
    let router = FakeRouter::start(100 * GIB).await;
    router.add_go_driver_disk(GO_VOLUME, DIR, 20 * GIB, 4421);
    let b = backend(&router);
    let id = VolumeId::parse(GO_VOLUME).unwrap();
    let v = b.get_volume(&id).await.unwrap().expect("adopted");
    assert_eq!(v.capacity_bytes, 20 * GIB);
    assert!(v.supports(&handoff_csi::capability::Capability {
        mode: AccessMode::MultiNodeMultiWriter,
        access_type: handoff_csi::capability::AccessType::Block,
    }));
    assert_eq!(b.list_volumes().await.unwrap(), vec![v.clone()]);
    // Exported as the Go driver left it: its port and NQN.
    let ExportInfo::NvmeTcp {
        port,
        subsystem_nqn,
        ..
    } = b
        .export(&v, &NodeId::parse("node-a").unwrap())
        .await
        .unwrap()
    else {
        panic!("not NVMe/TCP")
    };
    assert_eq!(port, 4421);
    assert_eq!(
        subsystem_nqn,
        format!("nqn.2000-02.com.mikrotik:{GO_VOLUME}")
    );
    // CreateVolume of its PV name finds it instead of making another.
    let mut req = request(GO_VOLUME, 20 * GIB);
    req.capabilities = vec![StoredCapability {
        mode: AccessMode::MultiNodeMultiWriter,
        block: true,
    }];
    let same = b.create_volume(&req).await.unwrap();
    assert_eq!(same.id, id);
    assert!(router
        .commands()
        .iter()
        .all(|c| !c.starts_with("/disk add")));
    // Growing it gives it our record, with the exact size.
    b.expand_volume(&id, 21 * GIB).await.unwrap();
    assert!(router.disk(GO_VOLUME).unwrap()["comment"].starts_with("handoff2:"));
    assert_eq!(
        b.get_volume(&id).await.unwrap().unwrap().capacity_bytes,
        21 * GIB
    );
    // Free space comes from the pool disk (first component of the volume dir).
    let free = b.available_capacity().await.unwrap();
    assert!(free > 70 * GIB && free < 80 * GIB, "{free}");
}

/// The real binary with `--backend rds`: CreateVolume makes the disk on the router,
/// ControllerPublish hands nodes the RouterOS subsystem over NVMe/TCP, a live
/// migration's source is detached and the attachments table says it was NOT fenced.
#[tokio::test]
async fn the_driver_serves_rds_volumes_over_csi() {
    use handoff_csi::csi;
    use support::{block_cap, create_request, publish_request};
    let rwx = || block_cap(csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter);

    let router = FakeRouter::start(100 * GIB).await;
    let d = rds_driver(
        &router,
        router.host_key_line(),
        &["--rds-nvme-address", "10.0.0.9"],
    )
    .await;
    let mut c = d.controller().await;
    let name = "pvc-0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3";
    let v = c
        .create_volume(create_request(name, 64 << 20, rwx()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, name);
    assert!(router.disk(name).is_some(), "the disk is on the router");

    let ctx = c
        .controller_publish_volume(publish_request(name, "node-a", rwx()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["transport"], "nvme-tcp");
    assert_eq!(ctx["nvmeAddress"], "10.0.0.9");
    assert_eq!(
        ctx["nvmeSubsystemNqn"],
        format!("nqn.2000-02.com.mikrotik:{name}")
    );
    assert_eq!(
        ctx["nvmeHostNqn"],
        handoff_csi::export::node_host_nqn(&NodeId::parse("node-a").unwrap()),
        "the node connects under the name the disk admits"
    );
    c.controller_publish_volume(publish_request(name, "node-b", rwx()))
        .await
        .unwrap();
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: name.into(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["attachments", "--state-dir"])
        .arg(d.state_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("node-b [fenced: node-a]"), "{table}");
    // Issue 16 point 14: fenced at RouterOS — the disk admits node-b's host only, and
    // its export was cycled so node-a's live connection dropped.
    let disk = router.disk(name).unwrap();
    let nqn = |n: &str| handoff_csi::export::node_host_nqn(&NodeId::parse(n).unwrap());
    assert_eq!(
        disk["nvme-tcp-server-allow-host-name"],
        format!("\"{}\"", nqn("node-b")),
        "{disk:?}"
    );
    assert_eq!(disk["nvme-tcp-export"], "yes");
    assert_eq!(router.state.lock().export_cycles[name], 1);

    // A volume in use is not deleted; once detached it is, and again is a no-op.
    let del = csi::DeleteVolumeRequest {
        volume_id: name.into(),
        ..Default::default()
    };
    assert_eq!(
        support::code(c.delete_volume(del.clone()).await),
        tonic::Code::FailedPrecondition
    );
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: name.into(),
        node_id: "node-b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(del.clone()).await.unwrap();
    assert!(router.disk(name).is_none());
    c.delete_volume(del).await.unwrap();
}

#[tokio::test]
async fn the_driver_refuses_rds_flags_that_would_skip_host_key_checks() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args([
            "--mode",
            "controller",
            "--backend",
            "rds",
            "--rds-address",
            "192.0.2.1:22",
            "--rds-password-file",
            "/dev/null",
            "--endpoint",
            "unix:///tmp/handoff-rds-flags.sock",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--rds-host-key"), "{err}");
}

/// The binary as an `rds` controller talking to `router`, pinned to `host_key` (a key
/// line or a fingerprint), with `extra` flags.
async fn rds_driver(router: &FakeRouter, host_key: String, extra: &[&str]) -> support::Driver {
    let mut args: Vec<String> = [
        "--backend",
        "rds",
        "--rds-address",
        &router.addr.to_string(),
        "--rds-user",
        USER,
        "--rds-key-file",
        &router.client_key_file.display().to_string(),
        "--rds-host-key",
        &host_key,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    support::Driver::start_with(support::DriverOptions {
        mode: "controller",
        extra_args: args,
        ..Default::default()
    })
    .await
}

/// The Controller service's other RPCs on `rds`: snapshots and restores, expansion,
/// capacity, health, and the status codes a full or unreachable router gives.
#[tokio::test]
async fn the_volume_lifecycle_over_csi_on_rds() {
    use handoff_csi::csi;
    use handoff_csi::csi::volume_content_source::{SnapshotSource, Type as Source};
    use support::{code, create_request, rwo_block};
    use tonic::Code;

    let router = FakeRouter::start(10 * GIB).await;
    let d = rds_driver(
        &router,
        router.host_fingerprint(),
        &["--rds-volume-dir", DIR, "--rds-attempts", "2"],
    )
    .await;
    let mut c = d.controller().await;
    let v = c
        .create_volume(create_request("disk-1", 64 << 20, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();

    // Capacity: the pool disk's free space, as the router reports it.
    let cap = c
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    // RouterOS prints it rounded to 0.1 GiB.
    let expected = (10 * GIB - (64 << 20)) as i64;
    assert!(
        (cap - expected).abs() <= (GIB / 10) as i64,
        "{cap} vs {expected}"
    );

    // Snapshot, then restore into a bigger volume.
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 64 << 20);
    let listed = c
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    let mut req = create_request("restored-1", 128 << 20, rwo_block());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(Source::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 128 << 20);
    assert!(restored.content_source.is_some());

    // Grow online; shrinking is OutOfRange.
    let expand = |bytes: i64| csi::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capability: Some(rwo_block()),
        ..Default::default()
    };
    let grown = c
        .controller_expand_volume(expand(96 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 96 << 20);
    assert_eq!(
        code(c.controller_expand_volume(expand(32 << 20)).await),
        Code::OutOfRange
    );

    // Health: a disk removed behind the driver's back is abnormal.
    let get = |id: &str| csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    let ok = c
        .controller_get_volume(get(&v.volume_id))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.status.unwrap().volume_condition.unwrap().abnormal);
    router
        .state
        .lock()
        .disks
        .retain(|d| d.get("slot") != Some(&format!("\"{}\"", restored.volume_id)));
    assert_eq!(
        code(c.controller_get_volume(get(&restored.volume_id)).await),
        Code::NotFound
    );

    // A full router: ResourceExhausted, and nothing half-made is left behind.
    let before = router.state.lock().disks.len();
    assert_eq!(
        code(
            c.create_volume(create_request("too-big", 100 << 30, rwo_block()))
                .await
        ),
        Code::ResourceExhausted
    );
    assert_eq!(router.state.lock().disks.len(), before);

    // Snapshot and volume deletion are idempotent.
    let del_snap = csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    };
    c.delete_snapshot(del_snap.clone()).await.unwrap();
    c.delete_snapshot(del_snap).await.unwrap();

    // The router unreachable: Unavailable (retryable), Probe not ready.
    router.state.lock().down = true;
    let status = c
        .create_volume(create_request("while-down", 64 << 20, rwo_block()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let probe = d.identity().await.probe(csi::ProbeRequest {}).await;
    assert!(
        probe
            .as_ref()
            .map_or(true, |p| p.get_ref().ready != Some(true)),
        "{probe:?}"
    );
}

/// Skipping host-key verification is possible only by its own flag, and says so loudly.
#[test]
fn skipping_host_key_verification_is_logged_as_a_warning() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let password = support::routeros::write_file(dir.path(), "password", "x");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["--mode", "controller", "--backend", "rds"])
        .args([
            "--rds-address",
            "192.0.2.1:22",
            "--rds-insecure-skip-host-key-check",
        ])
        .arg("--rds-password-file")
        .arg(&password)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
        .args(["--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let warning = (0..200).find_map(|_| {
        let line = rx.recv_timeout(Duration::from_millis(100)).ok()?;
        line.contains("host key verification is OFF")
            .then_some(line)
    });
    let _ = child.kill();
    let _ = child.wait();
    let line = warning.expect("no warning about host key verification");
    assert!(line.contains("\"WARN\""), "{line}");
}

/// Issue 16 points 10–15 against a router that prints what a real one prints: a long
/// unquoted file path cut mid-value, raw sizes in groups of three, the record comment
/// wrapped over lines, capacity by mount point, the Go driver's snapshots, and an error
/// that exits with status 1.
#[tokio::test]
async fn a_real_routers_output_is_read_right() {
    let router = FakeRouter::start(100 * GIB).await;
    // The volume dir a real install uses is long enough for every path to wrap.
    let dir = "/nvme1/kubernetes/handoff-csi/volumes";
    let b = RdsBackend::new(
        Arc::new(SshShell::new(target(
            &router,
            pinned(&router),
            Credentials::KeyFile(router.client_key_file.clone()),
        ))),
        RdsSettings {
            volume_dir: dir.into(),
            nvme_address: "10.0.0.9".into(),
            nvme_port: 4420,
            attempts: 3,
            backoff: Duration::from_millis(5),
        },
    );
    let v = b
        .create_volume(&request("pvc-0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3", GIB))
        .await
        .unwrap();
    let printed = {
        let mut s = router.state.lock();
        s.commands.clear();
        drop(s);
        router.print_detail()
    };
    let path_line = printed
        .lines()
        .find(|l| l.contains("file-path="))
        .expect("printed");
    assert!(
        !path_line.contains(".img"),
        "the fake cuts the path as a real console does:\n{printed}"
    );
    assert!(printed.lines().filter(|l| l.contains(";;;")).count() == 1);
    assert!(
        printed
            .lines()
            .any(|l| l.trim_start().starts_with("size=") || l.contains(" size=1 073 741 824")),
        "{printed}"
    );
    // The record in the wrapped comment still reads back: name, exact size.
    assert_eq!(b.get_volume(&v.id).await.unwrap().unwrap(), v);
    // Capacity: the partition mounted at the pool, its free bytes in groups of three.
    let free = router.state.lock().free;
    assert_eq!(b.available_capacity().await.unwrap(), free);
    assert!(router
        .take_commands()
        .iter()
        .any(|c| c == "/disk print detail where mount-point=\"nvme1\""));
    // Delete removes the disk and its whole file: nothing leaks.
    b.delete_volume(&v.id).await.unwrap();
    assert!(
        router.state.lock().files.is_empty(),
        "{:?}",
        router.state.lock().files
    );
    assert!(router.take_commands().iter().any(|c| c
        == &format!(
            "/file remove [find name=\"{}/{}.img\"]",
            dir.trim_start_matches('/'),
            v.id
        )));

    // The Go driver's snapshot is listed, restorable and deletable.
    let go_snap = "snap-3c6f1a2b-1111-4222-8333-944455556666-at-1764547200";
    router.add_go_driver_disk(GO_VOLUME, dir, 2 * GIB, 4420);
    router.add_go_driver_snapshot(go_snap, dir, 2 * GIB);
    let snaps = b.list_snapshots().await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].id.as_str(), go_snap);
    assert_eq!(snaps[0].source_volume.as_str(), GO_VOLUME);
    let mut req = request("restored-from-go", 2 * GIB);
    req.source = Some(ContentSource::Snapshot(snaps[0].id.clone()));
    let restored = b.create_volume(&req).await.unwrap();
    assert_eq!(restored.capacity_bytes, 2 * GIB);
    b.delete_snapshot(&snaps[0].id).await.unwrap();
    assert!(b.list_snapshots().await.unwrap().is_empty());

    // An error is RouterOS's text with exit status 1: a failure, never "done".
    let err = b
        .create_volume(&request("far-too-big", 1000 * GIB))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::NoSpace(_)), "{err}");
}

/// The fence at RouterOS fails closed and heals: a repeated unpublish (a retry after a
/// failure mid-way) cycles the export again, and an export left off by a cut-short cycle
/// is turned back on for the nodes still allowed.
#[tokio::test]
async fn the_routeros_fence_is_repeated_on_retry_and_leaves_the_export_on() {
    let router = FakeRouter::start(100 * GIB).await;
    let b = backend(&router);
    let v = b.create_volume(&request("fenced-disk", GIB)).await.unwrap();
    let (a_node, b_node) = (
        NodeId::parse("node-a").unwrap(),
        NodeId::parse("node-b").unwrap(),
    );
    for n in [&a_node, &b_node] {
        b.export(&v, n).await.unwrap();
        b.allow_node(&v, n).await.unwrap();
    }
    let nqn = |n: &NodeId| handoff_csi::export::node_host_nqn(n);
    assert_eq!(
        router.disk(v.id.as_str()).unwrap()["nvme-tcp-server-allow-host-name"],
        format!("\"{},{}\"", nqn(&a_node), nqn(&b_node))
    );
    b.deny_node(&v.id, &a_node).await.unwrap();
    b.deny_node(&v.id, &a_node).await.unwrap();
    assert_eq!(
        router.state.lock().export_cycles[v.id.as_str()],
        2,
        "cycled on the retry too"
    );
    // A cycle cut short left the export off: the next attempt turns it back on.
    router
        .state
        .lock()
        .disks
        .iter_mut()
        .find(|d| d.get("slot").is_some_and(|s| s.contains(v.id.as_str())))
        .unwrap()
        .insert("nvme-tcp-export".into(), "no".into());
    b.deny_node(&v.id, &a_node).await.unwrap();
    let disk = router.disk(v.id.as_str()).unwrap();
    assert_eq!(disk["nvme-tcp-export"], "yes");
    assert_eq!(
        disk["nvme-tcp-server-allow-host-name"],
        format!("\"{}\"", nqn(&b_node))
    );
    // Unpublishing the last node admits nobody (never the empty "any host" list).
    b.deny_node(&v.id, &b_node).await.unwrap();
    assert_eq!(
        router.disk(v.id.as_str()).unwrap()["nvme-tcp-server-allow-host-name"],
        format!("\"{}\"", handoff_csi::backend::routeros::NO_HOST)
    );
}
