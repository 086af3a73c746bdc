//! KubeVirt's migration clock, computed as KubeVirt computes it: the completion timeout
//! is `completionTimeoutPerGiB` × the migration's data size in GB (rounded up), and it
//! runs from the moment the migration starts moving memory. The per-GiB value is the one
//! KubeVirt put in the VMI's `migrationState.migrationConfiguration` for *this*
//! migration (written at target hand-off, after the attach); before that, the default.

use std::time::Duration;

use super::{VmiEntry, TARGET_STARTUP_ALLOWANCE};
use crate::attachment::deadline::{DeadlineBasis, MigrationClock};

/// Bytes in a Kubernetes quantity ("2Gi", "2048Mi", "1.5G", "1e9"); fractions round up.
pub fn parse_quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let bytes = (number * multiplier).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// The migration data size KubeVirt times (virt-launcher's getVMIMigrationDataSize):
/// guest memory (its request, overridden by an explicit guest size), plus the volumes
/// being migrated, plus, with block migration, the ephemeral disks.
pub fn data_bytes(vmi: &VmiEntry) -> Option<u64> {
    let memory = vmi.memory_bytes?;
    let ephemeral = if vmi.block_migration {
        vmi.ephemeral_bytes
    } else {
        0
    };
    Some(
        memory
            .saturating_add(vmi.migrated_volume_bytes)
            .saturating_add(ephemeral),
    )
}

/// The clock of migration `migration_uid` of `vmi` (`None`: no migration matched yet),
/// or `None` when the guest's size is unknown.
pub fn clock(
    vmi: &VmiEntry,
    migration_uid: Option<&str>,
    default_per_gib: u64,
) -> Option<MigrationClock> {
    let bytes = data_bytes(vmi)?;
    // Only this migration's own state counts: the VMI still shows the previous one's
    // until KubeVirt hands the target off.
    let state = vmi
        .migration
        .as_ref()
        .filter(|s| migration_uid.is_some_and(|u| u == s.uid));
    let config = state.and_then(|s| s.config.as_ref());
    let per_gib = config.and_then(|c| c.per_gib_secs);
    let per_gib_secs = per_gib.unwrap_or(default_per_gib);
    let data_gb = bytes.div_ceil(1_000_000_000);
    let mut completion = per_gib_secs.saturating_mul(data_gb);
    // virt-launcher's migration monitor: past the completion time it aborts, unless
    // workload disruption is allowed; then it switches to post-copy (when allowed) or
    // pauses the guest and doubles the time. KubeVirt before allowWorkloadDisruption
    // switched to post-copy on allowPostCopy alone.
    let switch = config.and_then(|c| {
        let disruption = c.allow_workload_disruption.unwrap_or(c.allow_post_copy);
        match (disruption, c.allow_post_copy) {
            (false, _) => None,
            (true, true) => Some("post-copy".to_owned()),
            (true, false) => Some("paused".to_owned()),
        }
    });
    if switch.is_some() {
        completion = completion.saturating_mul(2);
    }
    let running_since = state.and_then(|s| s.started);
    let startup_secs = if running_since.is_some() {
        0
    } else {
        TARGET_STARTUP_ALLOWANCE.as_secs()
    };
    Some(MigrationClock {
        running_since,
        completion: Duration::from_secs(completion),
        pending_allowance: TARGET_STARTUP_ALLOWANCE,
        basis: DeadlineBasis::Kubevirt {
            vmi: vmi.name.clone(),
            data_gb,
            per_gib_secs,
            startup_secs,
            running_since,
            configured: per_gib.is_some(),
            switch,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::{MigrationConfig, VmiMigrationState};
    use super::*;

    #[test]
    fn quantities_parse_to_bytes() {
        for (q, want) in [
            ("1Gi", 1u64 << 30),
            ("2048Mi", 2u64 << 30),
            ("1G", 1_000_000_000),
            ("1.5Gi", 3u64 << 29),
            ("1e9", 1_000_000_000),
            ("512", 512),
            ("100m", 1),
        ] {
            assert_eq!(parse_quantity_bytes(q), Some(want), "{q}");
        }
        for bad in ["", "Gi", "1Xi", "-1Gi", "1e"] {
            assert_eq!(parse_quantity_bytes(bad), None, "{bad}");
        }
    }

    fn vmi(memory: u64) -> VmiEntry {
        VmiEntry {
            namespace: "vms".into(),
            name: "vm".into(),
            uid: "u".into(),
            claims: vec![],
            memory_bytes: Some(memory),
            migrated_volume_bytes: 0,
            ephemeral_bytes: 0,
            block_migration: false,
            node: None,
            migration: None,
        }
    }

    #[test]
    fn default_deadline_before_hand_off_follows_kubevirt_defaults() {
        // 150 s × data size (GB rounded up) + 15 min pending allowance for the target.
        for (gib, data_gb, secs) in [
            (1u64, 2u64, 1200u64),
            (2, 3, 1350),
            (4, 5, 1650),
            (16, 18, 3600),
        ] {
            let c = clock(&vmi(gib << 30), Some("m1"), 150).unwrap();
            let attached = chrono::Utc::now();
            assert_eq!(
                c.timeout_from(attached),
                Duration::from_secs(secs),
                "{gib} GiB"
            );
            assert!(
                matches!(c.basis, DeadlineBasis::Kubevirt { data_gb: d, per_gib_secs: 150, configured: false, .. } if d == data_gb)
            );
        }
        // Decimal gigabytes are not rounded further.
        let c = clock(&vmi(4_000_000_000), None, 150).unwrap();
        assert_eq!(c.completion, Duration::from_secs(600));
    }

    #[test]
    fn only_this_migrations_configuration_counts_and_volumes_add_to_the_size() {
        let mut v = vmi(2 << 30);
        v.migrated_volume_bytes = 10_000_000_000;
        v.ephemeral_bytes = 5_000_000_000;
        v.migration = Some(VmiMigrationState {
            uid: "old".into(),
            target_node: None,
            completed: true,
            failed: false,
            aborted: false,
            started: None,
            config: Some(MigrationConfig {
                per_gib_secs: Some(10),
                allow_post_copy: false,
                allow_workload_disruption: Some(false),
            }),
        });
        // The previous migration's 10 s/GiB is not this one's: default 150 s/GiB.
        let c = clock(&v, Some("new"), 150).unwrap();
        // 2 GiB + 10 GB migrated volumes = 12.15 GB → 13 GB; no block migration.
        assert_eq!(c.completion, Duration::from_secs(150 * 13));
        // KubeVirt hands the target off: its MigrationPolicy's 60 s/GiB, post-copy on.
        let started = chrono::Utc::now();
        v.block_migration = true;
        v.migration = Some(VmiMigrationState {
            uid: "new".into(),
            target_node: Some("node-b".into()),
            completed: false,
            failed: false,
            aborted: false,
            started: Some(started),
            config: Some(MigrationConfig {
                per_gib_secs: Some(60),
                allow_post_copy: true,
                allow_workload_disruption: None,
            }),
        });
        let c = clock(&v, Some("new"), 150).unwrap();
        // + 5 GB ephemeral with block migration = 17.15 → 18 GB; × 60 × 2 (post-copy).
        assert_eq!(c.completion, Duration::from_secs(18 * 60 * 2));
        assert_eq!(c.running_since, Some(started));
        assert!(
            matches!(&c.basis, DeadlineBasis::Kubevirt { configured: true, switch: Some(s), startup_secs: 0, .. } if s == "post-copy")
        );
        // Newer KubeVirt: post-copy allowed but no disruption is an abort at 1×; a
        // disruption without post-copy pauses the guest, 2×.
        let with = |post_copy: bool, disruption: bool| {
            let mut v = v.clone();
            if let Some(m) = v.migration.as_mut() {
                m.config = Some(MigrationConfig {
                    per_gib_secs: Some(60),
                    allow_post_copy: post_copy,
                    allow_workload_disruption: Some(disruption),
                });
            }
            clock(&v, Some("new"), 150).unwrap()
        };
        assert_eq!(with(true, false).completion, Duration::from_secs(18 * 60));
        let paused = with(false, true);
        assert_eq!(paused.completion, Duration::from_secs(18 * 60 * 2));
        assert!(
            matches!(&paused.basis, DeadlineBasis::Kubevirt { switch: Some(s), .. } if s == "paused")
        );
        assert_eq!(
            with(true, true).completion,
            Duration::from_secs(18 * 60 * 2)
        );
    }
}
