//! Data-plane benchmark: the same I/O through a volume on the `file` plane (loop device
//! on the image) and on the `nbd` plane (loop device on nbd-client's FUSE disk, NBD over
//! loopback TCP to the controller's target), attached over the CSI socket as Kubernetes
//! would. O_DIRECT throughout. Also times the fence: ControllerUnpublish of a node with a
//! live NBD connection, start → OK (its next write then fails).
//!
//! Run as root: `cargo bench --bench dataplane -- [--seconds N] [--size-mib N]`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use handoff_csi::datacheck::{open_direct, AlignedBuf};
use handoff_csi::export::ExportInfo;
use handoff_csi::nbd::node::client::NbdClient;
use support::steps::{attach, detach, disk};
use support::*;

struct Args {
    seconds: u64,
    size_mib: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 3,
        size_mib: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse().ok()).expect("a number");
        match a.as_str() {
            "--seconds" => args.seconds = value(),
            "--size-mib" => args.size_mib = value(),
            _ => {} // cargo bench passes --bench
        }
    }
    args
}

/// Runs `threads` workers doing `op` until `secs` pass; returns operations per second.
fn run(
    dev: &File,
    threads: usize,
    secs: u64,
    op: impl Fn(&File, &mut Rng, &mut AlignedBuf) + Sync,
) -> f64 {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, done, op, dev) = (&stop, &done, &op, dev);
            s.spawn(move || {
                let mut rng = Rng::new(t as u64 + 1);
                let mut buf = AlignedBuf::new(1 << 20);
                while !stop.load(Ordering::Relaxed) {
                    op(dev, &mut rng, &mut buf);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

struct Figures {
    rand_read: f64,
    rand_write: f64,
    seq_read: f64,
    seq_write: f64,
}

fn workloads(dev: &File, size: u64, secs: u64) -> Figures {
    const K4: u64 = 4096;
    const M1: u64 = 1 << 20;
    let blocks = size / K4;
    let chunks = size / M1;
    let seq = AtomicU64::new(0);
    let seq_write = run(dev, 1, secs, |d, _, buf| {
        let i = seq.fetch_add(1, Ordering::Relaxed) % chunks;
        d.write_all_at(&buf.as_slice()[..M1 as usize], i * M1)
            .unwrap();
    }) * M1 as f64
        / 1e6;
    let seq_read = run(dev, 1, secs, |d, _, buf| {
        let i = seq.fetch_add(1, Ordering::Relaxed) % chunks;
        d.read_exact_at(&mut buf.as_mut_slice()[..M1 as usize], i * M1)
            .unwrap();
    }) * M1 as f64
        / 1e6;
    let rand_write = run(dev, 4, secs, |d, rng, buf| {
        let i = rng.next() % blocks;
        d.write_all_at(&buf.as_slice()[..K4 as usize], i * K4)
            .unwrap();
    });
    let rand_read = run(dev, 4, secs, |d, rng, buf| {
        let i = rng.next() % blocks;
        d.read_exact_at(&mut buf.as_mut_slice()[..K4 as usize], i * K4)
            .unwrap();
    });
    Figures {
        rand_read,
        rand_write,
        seq_read,
        seq_write,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: the benchmark attaches loop devices and mounts FUSE"
    );
    let port = free_port();
    let cluster = LocalCluster::start(
        &["node-a"],
        vec!["--nbd-listen".into(), format!("127.0.0.1:{port}")],
    )
    .await;
    let size = args.size_mib << 20;
    println!(
        "data-plane benchmark: {} MiB volume, {} s per workload, O_DIRECT; 4K random with 4 threads, 1M sequential with 1",
        args.size_mib, args.seconds
    );
    println!(
        "{:<6} {:>14} {:>15} {:>13} {:>14}",
        "plane", "4K rand read", "4K rand write", "1M seq read", "1M seq write"
    );
    for plane in ["file", "nbd"] {
        let id = disk(&cluster, &format!("bench-{plane}"), size as i64, plane).await;
        let a = attach(&cluster, &id, "node-a").await;
        let dev = open_direct(&a.target, true).unwrap();
        let secs = args.seconds;
        let f = tokio::task::spawn_blocking(move || {
            let f = workloads(&dev, size, secs);
            drop(dev);
            f
        })
        .await
        .unwrap();
        println!(
            "{:<6} {:>10.0} IOPS {:>11.0} IOPS {:>8.0} MB/s {:>9.0} MB/s",
            plane, f.rand_read, f.rand_write, f.seq_read, f.seq_write
        );
        detach(&cluster, &id, &a).await;
    }

    // Fence time: a node with a live connection is unpublished; the call returns once
    // the target has dropped it, and its next write fails.
    let id = disk(&cluster, "bench-fence", 16 << 20, "nbd").await;
    let mut times = Vec::new();
    for round in 0..30 {
        let node = format!("fence-{round}");
        // A node id the standalone controller knows: as if its plugin had started.
        cluster.controller.register_nodes(&[&node]);
        let ctx = cluster
            .controller
            .controller()
            .await
            .controller_publish_volume(publish_request(
                &id,
                &node,
                block_cap(Mode::MultiNodeMultiWriter),
            ))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        let ExportInfo::Nbd { address, export } = ExportInfo::from_publish_context(&ctx).unwrap()
        else {
            panic!("not an NBD export");
        };
        let mut c = NbdClient::connect(&address, &export).await.unwrap();
        c.write(0, &[1u8; 4096], false).await.unwrap();
        let started = Instant::now();
        cluster
            .controller
            .controller()
            .await
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node,
                ..Default::default()
            })
            .await
            .unwrap();
        times.push(started.elapsed());
        assert!(
            c.write(0, &[2u8; 4096], false).await.is_err(),
            "a fenced client could still write"
        );
    }
    times.sort();
    println!(
        "fence (ControllerUnpublish with a live NBD connection → OK, then refused), 30 rounds: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3
    );
}
