//! The `rds` backend against the fake RouterOS over real SSH on loopback: what the
//! driver itself costs per operation (the router's own work is not simulated).
//! - first command: TCP + SSH handshake + public-key login + one command;
//! - one command on the kept session (Identity Probe), p50/p99;
//! - CreateVolume + DeleteVolume cycles (3 + 3 commands) and concurrent creates, which
//!   the single serialised session queues.
//!
//! `cargo bench --bench rds [-- --rounds N]`

#[path = "support/args.rs"]
mod args;
#[path = "../tests/support/routeros.rs"]
mod routeros;

use args::arg;
use std::sync::Arc;
use std::time::{Duration, Instant};

use handoff_csi::backend::rds::{RdsBackend, RdsSettings};
use handoff_csi::backend::ssh::{Credentials, HostKeyPolicy, SshShell, SshTarget};
use handoff_csi::backend::{Backend, CapacityRange, CreateVolume, StoredCapability};
use handoff_csi::capability::AccessMode;
use handoff_csi::ids::VolumeName;
use routeros::{FakeRouter, USER};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn request(name: &str) -> CreateVolume {
    CreateVolume {
        name: VolumeName::parse(name).unwrap(),
        capacity: CapacityRange {
            required: 1 << 30,
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

fn backend(router: &FakeRouter) -> RdsBackend {
    RdsBackend::new(
        Arc::new(SshShell::new(SshTarget {
            address: router.addr.to_string(),
            user: USER.into(),
            credentials: Credentials::KeyFile(router.client_key_file.clone()),
            host_key: HostKeyPolicy::Pinned(vec![router.host_key_line().parse().unwrap()]),
            timeout: Duration::from_secs(10),
        })),
        RdsSettings {
            volume_dir: "/storage-pool/kubernetes-volumes".into(),
            nvme_address: "10.0.0.9".into(),
            nvme_port: 4420,
            attempts: 3,
            backoff: Duration::from_millis(100),
        },
    )
}

#[tokio::main]
async fn main() {
    let rounds = arg("--rounds", 200);
    let router = FakeRouter::start(u64::MAX / 2).await;
    let b = Arc::new(backend(&router));

    let t = Instant::now();
    b.probe().await.unwrap();
    println!(
        "first command (connect, handshake, login, run): {:?}",
        t.elapsed()
    );

    let mut probes = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        b.probe().await.unwrap();
        probes.push(t.elapsed());
    }
    probes.sort();
    println!(
        "one command on the kept session, {rounds} rounds: p50 {:?}, p99 {:?}",
        pct(&probes, 0.5),
        pct(&probes, 0.99)
    );

    let mut cycles = Vec::with_capacity(rounds);
    let start = Instant::now();
    for i in 0..rounds {
        let t = Instant::now();
        let v = b
            .create_volume(&request(&format!("bench-{i}")))
            .await
            .unwrap();
        b.delete_volume(&v.id).await.unwrap();
        cycles.push(t.elapsed());
    }
    let total = start.elapsed();
    cycles.sort();
    println!(
        "CreateVolume + DeleteVolume, {rounds} cycles: {:.0} cycles/s; p50 {:?}, p99 {:?}",
        rounds as f64 / total.as_secs_f64(),
        pct(&cycles, 0.5),
        pct(&cycles, 0.99)
    );

    let start = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { b.create_volume(&request(&format!("par-{i}"))).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = router.state.lock();
    println!(
        "32 concurrent CreateVolume: {:?} in all; most commands in flight at the router: {}; SSH logins: {}",
        start.elapsed(),
        s.max_in_flight,
        s.logins
    );
}
