//! CSI conformance over the real socket: required error codes and idempotency rules of
//! the Identity and Controller services, and argument checks of the Node service.
//! None of these need root: they stop before any kernel work.

mod support;

use std::collections::HashMap;
use std::path::Path;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use support::*;
use tonic::Code;

#[tokio::test]
async fn identity_reports_name_version_capabilities_and_health() {
    let d = Driver::start().await;
    let mut id = d.identity().await;
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "handoff.csi.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let has_service = |caps: &csi::GetPluginCapabilitiesResponse,
                       t: csi::plugin_capability::service::Type| {
        caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(csi::plugin_capability::Type::Service(s)) if s.r#type == t as i32)
        })
    };
    use csi::plugin_capability::service::Type as Svc;
    assert!(has_service(&caps, Svc::ControllerService), "{caps:?}");
    assert!(
        has_service(&caps, Svc::VolumeAccessibilityConstraints),
        "{caps:?}"
    );
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(csi::plugin_capability::Type::VolumeExpansion(e)) if e.r#type == csi::plugin_capability::volume_expansion::Type::Online as i32)));
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    // Probe really checks the backend: take the data dir away and it must fail.
    std::fs::remove_dir_all(d.data_dir().join("volumes")).unwrap();
    let status = id.probe(csi::ProbeRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

#[tokio::test]
async fn node_only_mode_serves_no_controller() {
    let d = Driver::start_with(DriverOptions {
        mode: "node",
        ..Default::default()
    })
    .await;
    let caps = d
        .identity()
        .await
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(csi::plugin_capability::Type::Service(s)) if s.r#type == csi::plugin_capability::service::Type::ControllerService as i32)));
    let r = d
        .controller()
        .await
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await;
    assert_eq!(code(r), Code::Unimplemented);
    let info = d
        .node()
        .await
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.into_inner().node_id, "node-a");
}

#[tokio::test]
async fn create_volume_is_idempotent_by_name() {
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let first = c
        .create_volume(create_request("pvc-1", 10 * MIB + 1, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(first.capacity_bytes, 11 * MIB, "rounded up to whole MiB");
    assert!(first.volume_id.starts_with("vol-"));
    let again = c
        .create_volume(create_request("pvc-1", 10 * MIB + 1, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, first);

    // Same name, incompatible size or capability: AlreadyExists.
    let bigger = c
        .create_volume(create_request("pvc-1", 100 * MIB, rwo_block()))
        .await;
    assert_eq!(code(bigger), Code::AlreadyExists);
    let rwx = c
        .create_volume(create_request(
            "pvc-1",
            10 * MIB,
            block_cap(Mode::MultiNodeMultiWriter),
        ))
        .await;
    assert_eq!(code(rwx), Code::AlreadyExists);
}

#[tokio::test]
async fn create_volume_rejects_bad_input_with_spec_codes() {
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let no_name = c.create_volume(create_request("", MIB, rwo_block())).await;
    assert_eq!(code(no_name), Code::InvalidArgument);
    let mut no_caps = create_request("n", MIB, rwo_block());
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    let rwx_fs = create_request("n", MIB, mount_cap(Mode::MultiNodeMultiWriter, "ext4"));
    let status = c.create_volume(rwx_fs).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("Block"), "{}", status.message());
    let mut unsatisfiable = create_request("n", MIB + 1, rwo_block());
    unsatisfiable.capacity_range.as_mut().unwrap().limit_bytes = MIB + 2;
    assert_eq!(code(c.create_volume(unsatisfiable).await), Code::OutOfRange);
    let mut negative = create_request("n", -1, rwo_block());
    negative.capacity_range.as_mut().unwrap().required_bytes = -5;
    assert_eq!(code(c.create_volume(negative).await), Code::InvalidArgument);
    let mut params = create_request("n", MIB, rwo_block());
    params.parameters = HashMap::from([("replicas".into(), "3".into())]);
    let status = c.create_volume(params).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("replicas"));
    let bad_fs = create_request("n", MIB, rwo_mount("ntfs"));
    assert_eq!(code(c.create_volume(bad_fs).await), Code::InvalidArgument);
    let control = create_request("bad\u{7}name", MIB, rwo_block());
    assert_eq!(code(c.create_volume(control).await), Code::InvalidArgument);
    // Nothing half-created was left behind by any of these.
    let images = std::fs::read_dir(d.data_dir().join("volumes"))
        .unwrap()
        .count();
    assert_eq!(images, 0);
}

#[tokio::test]
async fn delete_volume_is_idempotent_and_refuses_published_volumes() {
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let v = c
        .create_volume(create_request("pvc-del", MIB, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.controller_publish_volume(publish_request(&v.volume_id, "node-a", rwo_block()))
        .await
        .unwrap();
    let busy = c
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(busy), Code::FailedPrecondition);
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for _ in 0..2 {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Ids this driver never issued are already "deleted".
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "some-vol-id".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let empty = c.delete_volume(csi::DeleteVolumeRequest::default()).await;
    assert_eq!(code(empty), Code::InvalidArgument);
    let traversal = c
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "../../etc".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(traversal), Code::InvalidArgument);
}

#[tokio::test]
async fn controller_publish_rules_and_codes() {
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let v = c
        .create_volume(create_request("pvc-pub", MIB, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = v.volume_id.as_str();

    let unknown = c
        .controller_publish_volume(publish_request(
            &format!("vol-{}", "0".repeat(32)),
            "node-a",
            rwo_block(),
        ))
        .await;
    assert_eq!(code(unknown), Code::NotFound);
    let no_node = c
        .controller_publish_volume(publish_request(id, "", rwo_block()))
        .await;
    assert_eq!(code(no_node), Code::InvalidArgument);
    let mut no_cap = publish_request(id, "node-a", rwo_block());
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.controller_publish_volume(no_cap).await),
        Code::InvalidArgument
    );
    let other_cap = c
        .controller_publish_volume(publish_request(id, "node-a", rwo_mount("ext4")))
        .await;
    assert_eq!(code(other_cap), Code::InvalidArgument);
    let rwx_fs = c
        .controller_publish_volume(publish_request(
            id,
            "node-a",
            mount_cap(Mode::MultiNodeMultiWriter, "ext4"),
        ))
        .await
        .unwrap_err();
    assert_eq!(rwx_fs.code(), Code::InvalidArgument);
    assert!(
        rwx_fs.message().contains("corrupts"),
        "{}",
        rwx_fs.message()
    );

    let first = c
        .controller_publish_volume(publish_request(id, "node-a", rwo_block()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.publish_context["transport"], "loop");
    let again = c
        .controller_publish_volume(publish_request(id, "node-a", rwo_block()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.publish_context, first.publish_context);

    let status = c
        .controller_publish_volume(publish_request(id, "node-b", rwo_block()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("node-a"), "{}", status.message());

    let mut ro = publish_request(id, "node-a", rwo_block());
    ro.readonly = true;
    assert_eq!(
        code(c.controller_publish_volume(ro).await),
        Code::AlreadyExists
    );

    for node in ["node-a", "node-a", "node-never"] {
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.controller_publish_volume(publish_request(id, "node-b", rwo_block()))
        .await
        .unwrap();
}

#[tokio::test]
async fn rwx_block_takes_two_nodes_and_survives_a_crash() {
    let mut d = Driver::start().await;
    let rwx = block_cap(Mode::MultiNodeMultiWriter);
    let mut c = d.controller().await;
    let v = c
        .create_volume(create_request("vm-disk", MIB, rwx.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = v.volume_id.clone();
    for node in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, node, rwx.clone()))
            .await
            .unwrap();
    }
    let status = c
        .controller_publish_volume(publish_request(&id, "node-c", rwx.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("migration limit"),
        "{}",
        status.message()
    );

    d.crash_and_restart().await;
    let mut c = d.controller().await;
    // The dual attachment survived: a third node is still refused, both holders are OK.
    let again = c
        .controller_publish_volume(publish_request(&id, "node-c", rwx.clone()))
        .await;
    assert_eq!(code(again), Code::FailedPrecondition);
    for node in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, node, rwx.clone()))
            .await
            .unwrap();
    }
    // The source leaves: the target is the sole holder and a new target may come.
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.controller_publish_volume(publish_request(&id, "node-c", rwx))
        .await
        .unwrap();
}

#[tokio::test]
async fn validate_volume_capabilities() {
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let v = c
        .create_volume(create_request("pvc-val", MIB, rwo_mount("xfs")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let req = |caps| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(req(vec![rwo_mount("xfs")]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = c
        .validate_volume_capabilities(req(vec![rwo_block()]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());
    assert_eq!(
        code(c.validate_volume_capabilities(req(vec![])).await),
        Code::InvalidArgument
    );
    let rwx_fs = req(vec![mount_cap(Mode::MultiNodeMultiWriter, "ext4")]);
    assert_eq!(
        code(c.validate_volume_capabilities(rwx_fs).await),
        Code::InvalidArgument
    );
    let unknown = csi::ValidateVolumeCapabilitiesRequest {
        volume_id: "some-vol-id".into(),
        volume_capabilities: vec![rwo_block()],
        ..Default::default()
    };
    assert_eq!(
        code(c.validate_volume_capabilities(unknown).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn unimplemented_controller_rpcs_say_so() {
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let caps = c
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.capabilities.len(),
        handoff_csi::controller::CAPABILITIES.len()
    );
    assert_eq!(
        code(
            c.controller_modify_volume(csi::ControllerModifyVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
}

#[tokio::test]
async fn node_validates_arguments_before_touching_the_kernel() {
    let d = Driver::start().await;
    let mut n = d.node().await;
    let target = d.path("target");
    let stage = |volume_id: &str, staging: &str, cap: Option<csi::VolumeCapability>| {
        csi::NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.into(),
            volume_capability: cap,
            publish_context: HashMap::from([("transport".into(), "loop".into())]),
            ..Default::default()
        }
    };
    let valid_id = format!("vol-{}", "1".repeat(32));
    assert_eq!(
        code(
            n.node_stage_volume(stage("", "/x", Some(rwo_block())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage(&valid_id, "", Some(rwo_block())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_stage_volume(stage(&valid_id, "/x", None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage(&valid_id, "rel/x", Some(rwo_block())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            n.node_stage_volume(stage(
                "some-vol-id",
                &d.path("staging").display().to_string(),
                Some(rwo_block())
            ))
            .await
        ),
        Code::NotFound
    );
    // publish_context pointing outside the data dir is refused, never attached.
    let mut hostile = stage(&valid_id, "/x", Some(rwo_block()));
    hostile
        .publish_context
        .insert("imagePath".into(), "/etc/shadow".into());
    assert_eq!(
        code(n.node_stage_volume(hostile).await),
        Code::InvalidArgument
    );

    let publish = csi::NodePublishVolumeRequest {
        volume_id: valid_id.clone(),
        staging_target_path: d.path("staging").display().to_string(),
        target_path: String::new(),
        volume_capability: Some(rwo_block()),
        ..Default::default()
    };
    assert_eq!(
        code(n.node_publish_volume(publish).await),
        Code::InvalidArgument
    );

    // Regression (found by tests/hostile_input.rs): a path outside the kubelet dir is
    // refused before any unmount or removal — NodeUnpublish("/etc") once tried rmdir.
    for outside in ["/etc", "/", "/tmp"] {
        let r = n
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: valid_id.clone(),
                target_path: outside.into(),
            })
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{outside}");
        let r = n
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: valid_id.clone(),
                staging_target_path: outside.into(),
            })
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{outside}");
    }
    assert!(Path::new("/etc/passwd").exists());

    // Undoing something that was never done succeeds.
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: valid_id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "some-vol-id".into(),
        staging_target_path: d.path("staging").display().to_string(),
    })
    .await
    .unwrap();
    let no_path = n
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: valid_id.clone(),
            staging_target_path: String::new(),
        })
        .await;
    assert_eq!(code(no_path), Code::InvalidArgument);

    let stats = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: valid_id,
            volume_path: d.path("nowhere").display().to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(stats), Code::NotFound);

    let caps = n
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 4);
    let info = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.handoff.csi.dev/pool"],
        "default"
    );
}

#[tokio::test]
async fn sigterm_removes_the_socket_and_a_stale_socket_is_replaced() {
    let mut d = Driver::start().await;
    let status = d.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(
        !d.socket.exists(),
        "socket must be removed on graceful shutdown"
    );

    // A crash leaves the socket file behind; the next start replaces it.
    let mut d = Driver::start().await;
    d.stop(nix::sys::signal::Signal::SIGKILL);
    assert!(d.socket.exists());
    d.crash_and_restart().await;
    d.identity()
        .await
        .probe(csi::ProbeRequest {})
        .await
        .unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&d.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

/// Issue 16 point 17: the csi-sanity v5.3.0 cases this driver failed, reproduced. The
/// suite sends ids the driver never issued with one required field missing (InvalidArgument
/// before any lookup), a relative stats or expand path (NotFound: the volume is not
/// there), and a node no plugin registered (NotFound).
#[tokio::test]
async fn csi_sanity_cases_required_fields_first_unknown_paths_and_nodes() {
    let d = Driver::start().await;
    let mut n = d.node().await;
    let foreign = "fake-vol-id-0001";
    let staging = d.path("staging").display().to_string();
    let target = d.path("target").display().to_string();
    let no_target = n
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: foreign.into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(rwo_block()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_target.code(), Code::InvalidArgument, "{no_target:?}");
    assert!(no_target.message().contains("target_path"), "{no_target:?}");
    let no_cap = n
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: foreign.into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(no_cap), Code::InvalidArgument);
    let no_staging = n
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: foreign.into(),
            volume_capability: Some(rwo_block()),
            publish_context: HashMap::from([("transport".into(), "loop".into())]),
            ..Default::default()
        })
        .await;
    assert_eq!(code(no_staging), Code::InvalidArgument);
    let no_path = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: foreign.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(no_path), Code::InvalidArgument);
    // Every field present: now the foreign id is what is wrong.
    let all_there = n
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: foreign.into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(rwo_block()),
            ..Default::default()
        })
        .await;
    assert_eq!(code(all_there), Code::NotFound);

    let mut c = d.controller().await;
    let v = c
        .create_volume(create_request("sanity-stats", MIB, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let elsewhere = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::NotFound, "{elsewhere:?}");
    // NodeExpandVolume "should fail when volume is not found" (found by running
    // csi-sanity v5.3.0 itself): an id never issued, at a relative path.
    let expand_foreign = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "fake-vol-id-0002".into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(expand_foreign.code(), Code::NotFound, "{expand_foreign:?}");
    let expand_no_path = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(expand_no_path), Code::InvalidArgument);

    let fake_node = c
        .controller_publish_volume(publish_request(
            &v.volume_id,
            "some-fake-node-id",
            rwo_block(),
        ))
        .await
        .unwrap_err();
    assert_eq!(fake_node.code(), Code::NotFound, "{fake_node:?}");
    assert!(
        fake_node.message().contains("registered"),
        "says what to check: {}",
        fake_node.message()
    );
    // Its own node (mode all) registered at start-up; so does a plugin started later.
    c.controller_publish_volume(publish_request(&v.volume_id, d.node_id(), rwo_block()))
        .await
        .unwrap();
    let info = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, d.node_id());
}
