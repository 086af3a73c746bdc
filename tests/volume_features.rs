//! Snapshots, restores, clones, expansion, listing, capacity, health and topology over
//! the socket. Data checks write into the images directly, so no root is needed here;
//! tests/e2e_features.rs repeats the data paths through real mounts.

mod support;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use handoff_csi::csi;
use handoff_csi::csi::volume_content_source::{SnapshotSource, Type as Source, VolumeSource};
use support::*;
use tonic::Code;

async fn create(d: &Driver, name: &str, bytes: i64) -> csi::Volume {
    d.controller()
        .await
        .create_volume(create_request(name, bytes, rwo_block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

fn image(d: &Driver, id: &str) -> std::path::PathBuf {
    d.data_dir().join("volumes").join(format!("{id}.img"))
}

fn write_at(d: &Driver, id: &str, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image(d, id))
        .unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_at(d: &Driver, id: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::fs::File::open(image(d, id))
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

async fn snapshot(d: &Driver, name: &str, source: &str) -> Result<csi::Snapshot, tonic::Status> {
    d.controller()
        .await
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot.unwrap())
}

fn from_source(name: &str, bytes: i64, source: Source) -> csi::CreateVolumeRequest {
    let mut req = create_request(name, bytes, rwo_block());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

#[tokio::test]
async fn snapshot_restore_keeps_the_data_of_the_moment() {
    let d = Driver::start().await;
    let src = create(&d, "src", 8 * MIB).await;
    write_at(&d, &src.volume_id, 4096, b"before the snapshot");
    let snap = snapshot(&d, "snap-1", &src.volume_id).await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 8 * MIB);
    assert_eq!(snap.source_volume_id, src.volume_id);
    assert!(snap.creation_time.is_some());
    // Idempotent by name; the same name for another source is AlreadyExists.
    assert_eq!(snapshot(&d, "snap-1", &src.volume_id).await.unwrap(), snap);
    let other = create(&d, "other", MIB).await;
    assert_eq!(
        code(snapshot(&d, "snap-1", &other.volume_id).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(snapshot(&d, "snap-x", &format!("vol-{}", "0".repeat(32))).await),
        Code::NotFound
    );

    write_at(&d, &src.volume_id, 4096, b"AFTER the snapshot!");
    let mut c = d.controller().await;
    let restored = c
        .create_volume(from_source(
            "restored",
            16 * MIB,
            Source::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        restored.capacity_bytes,
        16 * MIB,
        "larger than the snapshot: grown"
    );
    assert_eq!(
        read_at(&d, &restored.volume_id, 4096, 19),
        b"before the snapshot"
    );
    assert!(matches!(
        restored.content_source.unwrap().r#type,
        Some(Source::Snapshot(s)) if s.snapshot_id == snap.snapshot_id
    ));
    // Smaller than the snapshot cannot be honoured.
    let mut small = from_source(
        "too-small",
        MIB,
        Source::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        }),
    );
    small.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    assert_eq!(code(c.create_volume(small).await), Code::OutOfRange);
    let missing = from_source(
        "nope",
        MIB,
        Source::Snapshot(SnapshotSource {
            snapshot_id: format!("snap-{}", "0".repeat(32)),
        }),
    );
    assert_eq!(code(c.create_volume(missing).await), Code::NotFound);

    for _ in 0..2 {
        c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: "unknown".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The restored volume does not depend on the deleted snapshot.
    assert_eq!(
        read_at(&d, &restored.volume_id, 4096, 19),
        b"before the snapshot"
    );
}

#[tokio::test]
async fn clones_copy_detached_volumes_and_refuse_non_atomic_copies_of_attached_ones() {
    let d = Driver::start().await;
    let src = create(&d, "clone-src", 4 * MIB).await;
    write_at(&d, &src.volume_id, 0, b"clone me");
    let mut c = d.controller().await;
    let clone = c
        .create_volume(from_source(
            "clone",
            0,
            Source::Volume(VolumeSource {
                volume_id: src.volume_id.clone(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        clone.capacity_bytes,
        4 * MIB,
        "unspecified size: the source's"
    );
    assert_eq!(read_at(&d, &clone.volume_id, 0, 8), b"clone me");

    c.controller_publish_volume(publish_request(&src.volume_id, "node-a", rwo_block()))
        .await
        .unwrap();
    // /tmp is ext4 here: no reflink, so a copy of an attached volume would not be a
    // consistent point in time. (xfs/btrfs reflink: see tests/e2e_features.rs.)
    let status = snapshot(&d, "while-attached", &src.volume_id).await;
    if let Err(s) = status {
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("reflink"), "{}", s.message());
        let clone2 = c
            .create_volume(from_source(
                "clone-attached",
                0,
                Source::Volume(VolumeSource {
                    volume_id: src.volume_id.clone(),
                }),
            ))
            .await;
        assert_eq!(code(clone2), Code::FailedPrecondition);
    }
}

#[tokio::test]
async fn list_snapshots_filters_and_pages() {
    let d = Driver::start().await;
    let (a, b) = (create(&d, "la", MIB).await, create(&d, "lb", MIB).await);
    let mut ids = Vec::new();
    for i in 0..5 {
        let src = if i < 3 { &a } else { &b };
        ids.push(
            snapshot(&d, &format!("s{i}"), &src.volume_id)
                .await
                .unwrap()
                .snapshot_id,
        );
    }
    let mut c = d.controller().await;
    let list = |req: csi::ListSnapshotsRequest| {
        let mut c = c.clone();
        async move { c.list_snapshots(req).await }
    };
    let by_source = list(csi::ListSnapshotsRequest {
        source_volume_id: a.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_source.entries.len(), 3);
    let by_id = list(csi::ListSnapshotsRequest {
        snapshot_id: ids[4].clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(
        by_id.entries[0].snapshot.as_ref().unwrap().source_volume_id,
        b.volume_id
    );
    let none = list(csi::ListSnapshotsRequest {
        snapshot_id: "nope".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert!(none.entries.is_empty());

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(csi::ListSnapshotsRequest {
            max_entries: 2,
            starting_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    ids.sort();
    assert_eq!(seen, ids);
    assert_eq!(
        code(
            list(csi::ListSnapshotsRequest {
                starting_token: "garbage".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            list(csi::ListSnapshotsRequest {
                max_entries: -1,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let _ = c
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn list_volumes_pages_with_published_nodes_and_get_volume_reports_health() {
    let d = Driver::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&d, &format!("v{i}"), MIB).await.volume_id);
    }
    let mut c = d.controller().await;
    c.controller_publish_volume(publish_request(&ids[2], "node-a", rwo_block()))
        .await
        .unwrap();
    let mut seen = HashMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for e in page.entries {
            let status = e.status.unwrap();
            assert!(!status.volume_condition.unwrap().abnormal);
            seen.insert(e.volume.unwrap().volume_id, status.published_node_ids);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[&ids[2]], vec!["node-a".to_string()]);
    assert!(seen[&ids[0]].is_empty());
    let bad = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: "x/../y".into(),
        })
        .await;
    assert_eq!(code(bad), Code::Aborted);

    let get = |id: &str| csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    let ok = c
        .controller_get_volume(get(&ids[2]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ok.status.as_ref().unwrap().published_node_ids,
        vec!["node-a".to_string()]
    );
    assert!(!ok.status.unwrap().volume_condition.unwrap().abnormal);
    std::fs::remove_file(image(&d, &ids[0])).unwrap();
    let gone = c
        .controller_get_volume(get(&ids[0]))
        .await
        .unwrap()
        .into_inner();
    let condition = gone.status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal);
    assert!(
        condition.message.contains("missing"),
        "{}",
        condition.message
    );
    assert_eq!(
        code(c.controller_get_volume(get("some-vol-id")).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn controller_expansion_grows_and_never_shrinks() {
    let d = Driver::start().await;
    let v = create(&d, "grow", 8 * MIB).await;
    let mut c = d.controller().await;
    let expand = |bytes: i64| csi::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let r = c
        .controller_expand_volume(expand(20 * MIB + 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 21 * MIB);
    assert!(
        r.node_expansion_required,
        "loop devices must re-read the size on the node"
    );
    assert_eq!(
        std::fs::metadata(image(&d, &v.volume_id)).unwrap().len(),
        21 * MIB as u64
    );
    // Idempotent, and a retry with a smaller request than now is not a shrink of data.
    assert_eq!(
        c.controller_expand_volume(expand(21 * MIB))
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes,
        21 * MIB
    );
    assert_eq!(
        code(c.controller_expand_volume(expand(4 * MIB)).await),
        Code::OutOfRange
    );
    let missing = csi::ControllerExpandVolumeRequest {
        volume_id: format!("vol-{}", "0".repeat(32)),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    assert_eq!(
        code(c.controller_expand_volume(missing).await),
        Code::NotFound
    );
    let no_range = csi::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(c.controller_expand_volume(no_range).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn capacity_and_topology() {
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let cap = c
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    let st = nix::sys::statvfs::statvfs(&d.data_dir().join("volumes")).unwrap();
    let free = (st.blocks_available() * st.fragment_size()) as i64;
    assert!(cap.available_capacity > 0);
    assert!(
        (cap.available_capacity - free).abs() < 64 * MIB,
        "{} vs {free}",
        cap.available_capacity
    );
    let pool = |p: &str| csi::Topology {
        segments: HashMap::from([("topology.handoff.csi.dev/pool".into(), p.into())]),
    };
    let elsewhere = c
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(pool("other")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0);
    let bad = c
        .get_capacity(csi::GetCapacityRequest {
            parameters: HashMap::from([("typo".into(), "1".into())]),
            ..Default::default()
        })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);

    let mut req = create_request("topo", MIB, rwo_block());
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![pool("other")],
        preferred: vec![],
    });
    assert_eq!(
        code(c.create_volume(req.clone()).await),
        Code::ResourceExhausted
    );
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![pool("other"), pool("default")],
        preferred: vec![],
    });
    let v = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.accessible_topology, vec![pool("default")]);
}
