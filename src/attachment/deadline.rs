//! How long a dual attach may last before it is reported overdue (never revoked), and
//! why: KubeVirt's own completion timeout for the VMI when the cluster knows it, else the
//! StorageClass's migrationTimeoutSeconds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a migration's deadline is what it is, kept so operators can check it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum DeadlineBasis {
    /// KubeVirt's completion timeout for this VMI: per-GiB seconds × migration data size
    /// (guest memory plus migrated volumes plus, with block migration, ephemeral disks;
    /// in GB rounded up, as KubeVirt's `ScaledValue(Giga)`), counted from the moment the
    /// migration started running; before that, plus the time KubeVirt lets a target pod
    /// stay pending.
    Kubevirt {
        vmi: String,
        data_gb: u64,
        per_gib_secs: u64,
        startup_secs: u64,
        /// When KubeVirt started moving memory (VMI migrationState.startTimestamp).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        running_since: Option<DateTime<Utc>>,
        /// The per-GiB value came from the migration's own configuration (KubeVirt CR or
        /// MigrationPolicy), not the driver's default.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        configured: bool,
        /// "post-copy" or "paused": KubeVirt does not abort at the completion timeout but
        /// switches mode and goes on, so one more period is allowed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        switch: Option<String>,
    },
    /// The StorageClass's migrationTimeoutSeconds: no VMI uses the volume.
    StorageClass,
}

impl std::fmt::Display for DeadlineBasis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeadlineBasis::Kubevirt {
                vmi,
                data_gb,
                per_gib_secs,
                startup_secs,
                running_since,
                configured,
                switch,
            } => {
                let source = if *configured {
                    "from the migration's configuration"
                } else {
                    "default"
                };
                write!(
                    f,
                    "KubeVirt completion timeout of VMI {vmi}: {per_gib_secs}s/GiB ({source}) × {data_gb} GB"
                )?;
                match running_since {
                    Some(t) => write!(
                        f,
                        ", counted from the migration start at {}",
                        t.to_rfc3339()
                    )?,
                    None => write!(f, " + {startup_secs}s target start-up")?,
                }
                if let Some(mode) = switch {
                    write!(f, "; {mode} allowed: one more period after the switch")?;
                }
                Ok(())
            }
            DeadlineBasis::StorageClass => write!(f, "StorageClass migrationTimeoutSeconds"),
        }
    }
}

/// A KubeVirt migration's clock as the cluster shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationClock {
    /// Set once the migration runs; until then the pending allowance applies.
    pub running_since: Option<DateTime<Utc>>,
    /// What KubeVirt allows once running (already doubled for post-copy/paused).
    pub completion: Duration,
    /// What KubeVirt allows a target pod to stay pending before it gives up.
    pub pending_allowance: Duration,
    pub basis: DeadlineBasis,
}

impl MigrationClock {
    /// The timeout to store for a dual attach that began at `attached_at`.
    pub fn timeout_from(&self, attached_at: DateTime<Utc>) -> Duration {
        match self.running_since {
            Some(t) => (t - attached_at).to_std().unwrap_or(Duration::ZERO) + self.completion,
            None => self.pending_allowance + self.completion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_starts_when_the_migration_runs() {
        let attached: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let mut clock = MigrationClock {
            running_since: None,
            completion: Duration::from_secs(300),
            pending_allowance: Duration::from_secs(900),
            basis: DeadlineBasis::StorageClass,
        };
        assert_eq!(clock.timeout_from(attached), Duration::from_secs(1200));
        // Running 40 s after the attach: 40 + 300, the pending allowance no longer counts.
        clock.running_since = Some(attached + chrono::Duration::seconds(40));
        assert_eq!(clock.timeout_from(attached), Duration::from_secs(340));
        // A start stamped before the attach (clock skew) counts from the attach.
        clock.running_since = Some(attached - chrono::Duration::seconds(5));
        assert_eq!(clock.timeout_from(attached), Duration::from_secs(300));
    }

    #[test]
    fn old_records_without_the_new_fields_still_read() {
        let old =
            r#"{"from":"kubevirt","vmi":"vm","data_gb":5,"per_gib_secs":150,"startup_secs":900}"#;
        let b: DeadlineBasis = serde_json::from_str(old).unwrap();
        assert!(matches!(
            b,
            DeadlineBasis::Kubevirt {
                running_since: None,
                configured: false,
                switch: None,
                ..
            }
        ));
        assert_eq!(serde_json::to_string(&b).unwrap(), old);
    }
}
