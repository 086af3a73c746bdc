//! KubeVirt live migration end to end on one machine: a controller and two node plugins
//! as separate processes on one shared data dir, real loop devices, a VM stand-in
//! writing checksummed blocks with O_DIRECT through the hand-off. Needs root.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use handoff_csi::datacheck::{self, AlignedBuf, BLOCK};
use std::os::unix::fs::FileExt;
use support::steps::{attach, detach};
use support::*;

const BLOCKS: u64 = 2048; // 8 MiB

fn rwx() -> csi::VolumeCapability {
    block_cap(Mode::MultiNodeMultiWriter)
}

async fn vm_disk(cluster: &LocalCluster) -> String {
    cluster
        .controller
        .controller()
        .await
        .create_volume(create_request(
            "vm-disk",
            BLOCKS as i64 * BLOCK as i64,
            rwx(),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

#[tokio::test]
async fn live_migration_hands_off_with_every_block_intact() {
    if !require_root("live_migration_hands_off_with_every_block_intact") {
        return;
    }
    let cluster = LocalCluster::start(&["node-a", "node-b"], vec![]).await;
    let id = vm_disk(&cluster).await;
    let a = attach(&cluster, &id, "node-a").await;

    // The VM on node-a writes generation after generation until told to pause.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (target, stop) = (a.target.clone(), stop.clone());
        std::thread::spawn(move || {
            let dev = datacheck::open_direct(&target, true).unwrap();
            let mut last = vec![0u64; BLOCKS as usize];
            let mut buf = AlignedBuf::new(BLOCK);
            let mut generation = 1;
            'outer: loop {
                for index in 0..BLOCKS {
                    if stop.load(Ordering::SeqCst) && last.iter().all(|g| *g > 0) {
                        break 'outer;
                    }
                    datacheck::fill_block(buf.as_mut_slice(), index, generation);
                    dev.write_all_at(buf.as_slice(), index * BLOCK as u64)
                        .unwrap();
                    last[index as usize] = generation;
                }
                generation += 1;
            }
            // Switch-over: the source flushes before the target resumes.
            dev.sync_data().unwrap();
            last
        })
    };

    // Migration: the target is attached and published while the source keeps writing.
    let b = attach(&cluster, &id, "node-b").await;
    let state = cluster.stored_state(&id).unwrap();
    assert_eq!(stored_nodes(&state), ["node-a", "node-b"]);
    stop.store(true, Ordering::SeqCst);
    let expected = writer.join().unwrap();
    assert!(expected.iter().any(|g| *g >= 1));

    // The target reads every block back with O_DIRECT: nothing lost, nothing stale.
    let dev_b = datacheck::open_direct(&b.target, true).unwrap();
    assert_eq!(
        datacheck::verify_blocks(&dev_b, &expected),
        Ok(BLOCKS as usize)
    );
    let next: Vec<u64> = expected.iter().map(|g| g + 1).collect();
    datacheck::write_blocks(&dev_b, 0, BLOCKS, next[0]).unwrap();
    drop(dev_b);

    // The source goes away last, as KubeVirt does on success.
    detach(&cluster, &id, &a).await;
    let state = cluster.stored_state(&id).unwrap();
    assert_eq!(
        stored_nodes(&state),
        ["node-b"],
        "target promoted to primary"
    );
    assert!(state.get("migration_started_at").is_none());
    let dev_b = datacheck::open_direct(&b.target, false).unwrap();
    assert_eq!(
        datacheck::verify_blocks(&dev_b, &vec![next[0]; BLOCKS as usize]),
        Ok(BLOCKS as usize)
    );
    drop(dev_b);
    detach(&cluster, &id, &b).await;
    let root = std::fs::canonicalize(cluster.shared.path()).unwrap();
    assert!(loops_under(&root).is_empty(), "every loop device released");
}

/// Why direct I/O is mandatory: a reader that goes through a page cache keeps serving
/// what it cached before the other node wrote. Here the cache is node-b's block-device
/// cache; across hosts on NFS the backing file's cache behaves the same way, which is
/// why the loop devices themselves run with direct I/O as well.
#[tokio::test]
async fn buffered_reads_go_stale_direct_reads_do_not() {
    if !require_root("buffered_reads_go_stale_direct_reads_do_not") {
        return;
    }
    let cluster = LocalCluster::start(&["node-a", "node-b"], vec![]).await;
    let id = vm_disk(&cluster).await;
    let a = attach(&cluster, &id, "node-a").await;
    let b = attach(&cluster, &id, "node-b").await;
    for dev in loops_under(&std::fs::canonicalize(cluster.shared.path()).unwrap()) {
        let name = dev.file_name().unwrap().to_str().unwrap().to_owned();
        let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap();
        assert_eq!(dio.trim(), "1", "{name} must run with direct I/O");
    }
    let dev_a = datacheck::open_direct(&a.target, true).unwrap();
    datacheck::write_blocks(&dev_a, 0, 1, 1).unwrap();

    // node-b reads block 0 through its page cache...
    let buffered = std::fs::File::open(&b.target).unwrap();
    let mut buf = vec![0u8; BLOCK];
    buffered.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(datacheck::check_block(&buf, 0, None), Ok(1));
    // ...node-a writes a new generation...
    datacheck::write_blocks(&dev_a, 0, 1, 2).unwrap();
    // ...and the buffered reader still sees the old one: a stale read.
    buffered.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        datacheck::check_block(&buf, 0, None),
        Ok(1),
        "buffered read is stale"
    );
    // A direct reader sees the truth.
    let direct = datacheck::open_direct(&b.target, false).unwrap();
    assert_eq!(datacheck::verify_blocks(&direct, &[2]), Ok(1));
    drop((dev_a, buffered, direct));
    detach(&cluster, &id, &b).await;
    detach(&cluster, &id, &a).await;
}

#[tokio::test]
async fn node_plugin_restart_while_published_adopts_its_device() {
    if !require_root("node_plugin_restart_while_published_adopts_its_device") {
        return;
    }
    let mut cluster = LocalCluster::start(&["node-a", "node-b"], vec![]).await;
    let id = vm_disk(&cluster).await;
    let a = attach(&cluster, &id, "node-a").await;
    let b = attach(&cluster, &id, "node-b").await;
    let root = std::fs::canonicalize(cluster.shared.path()).unwrap();
    assert_eq!(loops_under(&root).len(), 2, "one loop device per node");

    cluster.node_mut("node-a").crash_and_restart().await;
    // Repeating the calls after the restart adopts node-a's device, never node-b's.
    let again = attach(&cluster, &id, "node-a").await;
    assert_eq!(again.target, a.target);
    assert_eq!(loops_under(&root).len(), 2);
    detach(&cluster, &id, &a).await;
    assert_eq!(loops_under(&root).len(), 1, "node-b's device untouched");
    let dev_b = datacheck::open_direct(&b.target, true).unwrap();
    datacheck::write_blocks(&dev_b, 0, 4, 9).unwrap();
    drop(dev_b);
    detach(&cluster, &id, &b).await;
    assert!(loops_under(&root).is_empty());
}

#[test]
fn demo_migration_runs_and_checks_the_data() {
    if !require_root("demo_migration_runs_and_checks_the_data") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(["demo", "migration", "--blocks", "512"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("512 of 512 blocks verified"), "{stdout}");
    assert!(
        stdout.contains("node-a → node-b"),
        "timeline shows the dual attachment: {stdout}"
    );
    assert!(stdout.contains("migration completed"), "{stdout}");
}
