//! StorageClass parameters, parsed into a typed struct at CreateVolume and kept typed in
//! every volume record (stored as the map they came as; a stored map that no longer
//! parses fails the load instead of falling back to defaults).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Keys the external-provisioner adds (PVC/PV names with --extra-create-metadata):
/// accepted, never interpreted, and not part of the volume's identity.
const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";
pub const MIGRATION_TIMEOUT_KEY: &str = "migrationTimeoutSeconds";
const MIGRATION_TIMEOUT_DEFAULT: u64 = 300;
const MIGRATION_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 30..=3600;
pub const DATA_PLANE_KEY: &str = "dataPlane";
pub const CTRL_LOSS_TMO_KEY: &str = "nvmeCtrlLossTmo";
/// The kernel's own default; finite, because an infinite one (-1) leaves I/O hung in D
/// state forever when a target is gone.
pub const CTRL_LOSS_TMO_DEFAULT: u32 = 600;
const CTRL_LOSS_TMO_RANGE: std::ops::RangeInclusive<u32> = 10..=86_400;

/// How nodes reach the volume's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPlane {
    /// The image file itself (node-local or on a shared filesystem), via a loop device.
    #[default]
    File,
    /// The controller's NBD target, with per-attachment secrets and fencing.
    Nbd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("parameter {key:?} is not known to this driver (known: {MIGRATION_TIMEOUT_KEY}, {DATA_PLANE_KEY}, {CTRL_LOSS_TMO_KEY}; keys prefixed {KUBERNETES_PREFIX} are passed through)")]
    Unknown { key: String },
    #[error("parameter {key:?} belongs to the Go RDS driver's StorageClasses; here it is the controller flag {flag}: remove it from the StorageClass (recreate the class under the same name; existing PVs are not affected)")]
    GoDriver { key: String, flag: &'static str },
    #[error("parameter {key}={value:?} is invalid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    /// How long a live migration may keep two nodes attached before it is reported as
    /// overdue. Access is never revoked when it passes.
    pub migration_timeout: Duration,
    pub data_plane: DataPlane,
    /// Seconds an NVMe/TCP host keeps reconnecting to a lost target before failing I/O.
    pub ctrl_loss_tmo: u32,
    /// The driver's own parameters, as given: the volume's identity for idempotency.
    pub raw: BTreeMap<String, String>,
}

impl TryFrom<&HashMap<String, String>> for VolumeParams {
    type Error = ParamError;

    fn try_from(params: &HashMap<String, String>) -> Result<Self, Self::Error> {
        let mut raw = BTreeMap::new();
        let mut migration_timeout = Duration::from_secs(MIGRATION_TIMEOUT_DEFAULT);
        let mut data_plane = DataPlane::default();
        let mut ctrl_loss_tmo = CTRL_LOSS_TMO_DEFAULT;
        for (key, value) in params {
            if key.starts_with(KUBERNETES_PREFIX) {
                continue;
            }
            match key.as_str() {
                MIGRATION_TIMEOUT_KEY => {
                    migration_timeout = parse_migration_timeout(value)?;
                }
                DATA_PLANE_KEY => {
                    data_plane = match value.as_str() {
                        "file" => DataPlane::File,
                        "nbd" => DataPlane::Nbd,
                        other => {
                            return Err(ParamError::Invalid {
                                key: DATA_PLANE_KEY,
                                value: other.chars().take(32).collect(),
                                reason: "expected \"file\" or \"nbd\"".into(),
                            })
                        }
                    };
                }
                CTRL_LOSS_TMO_KEY => {
                    ctrl_loss_tmo = value
                        .parse()
                        .ok()
                        .filter(|s| CTRL_LOSS_TMO_RANGE.contains(s))
                        .ok_or_else(|| ParamError::Invalid {
                            key: CTRL_LOSS_TMO_KEY,
                            value: value.chars().take(32).collect(),
                            reason: format!(
                                "expected whole seconds between {} and {} (an infinite timeout hangs I/O for good when a target is gone)",
                                CTRL_LOSS_TMO_RANGE.start(),
                                CTRL_LOSS_TMO_RANGE.end()
                            ),
                        })?;
                }
                "nvmeAddress" | "nvmePort" | "volumePath" => {
                    return Err(ParamError::GoDriver {
                        key: key.clone(),
                        flag: match key.as_str() {
                            "nvmeAddress" => "--rds-nvme-address",
                            "nvmePort" => "--rds-nvme-port",
                            _ => "--rds-volume-dir",
                        },
                    })
                }
                _ => {
                    return Err(ParamError::Unknown {
                        key: key.chars().take(64).collect(),
                    })
                }
            }
            raw.insert(key.clone(), value.clone());
        }
        Ok(VolumeParams {
            migration_timeout,
            data_plane,
            ctrl_loss_tmo,
            raw,
        })
    }
}

fn parse_migration_timeout(value: &str) -> Result<Duration, ParamError> {
    let invalid = |reason: String| ParamError::Invalid {
        key: MIGRATION_TIMEOUT_KEY,
        value: value.chars().take(32).collect(),
        reason,
    };
    let secs: u64 = value
        .parse()
        .map_err(|_| invalid("expected whole seconds, e.g. \"600\"".into()))?;
    if !MIGRATION_TIMEOUT_RANGE.contains(&secs) {
        return Err(invalid(format!(
            "must be between {} and {} seconds",
            MIGRATION_TIMEOUT_RANGE.start(),
            MIGRATION_TIMEOUT_RANGE.end()
        )));
    }
    Ok(Duration::from_secs(secs))
}

/// No parameters: every default (a volume adopted from another driver has none of ours).
impl Default for VolumeParams {
    fn default() -> Self {
        Self::try_from(&HashMap::new()).expect("the defaults are valid")
    }
}

impl serde::Serialize for VolumeParams {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for VolumeParams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: HashMap<String, String> = HashMap::deserialize(d)?;
        Self::try_from(&raw).map_err(serde::de::Error::custom)
    }
}

impl VolumeParams {
    /// Static per-volume facts the node and later calls see in volume_context.
    pub fn volume_context(&self) -> HashMap<String, String> {
        HashMap::from([(
            MIGRATION_TIMEOUT_KEY.to_owned(),
            self.migration_timeout.as_secs().to_string(),
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_kubernetes_keys() {
        let p = VolumeParams::try_from(&params(&[
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "vms"),
        ]))
        .unwrap();
        assert_eq!(p.migration_timeout, Duration::from_secs(300));
        assert!(p.raw.is_empty());
    }

    #[test]
    fn data_plane_is_file_or_nbd() {
        assert_eq!(
            VolumeParams::try_from(&params(&[])).unwrap().data_plane,
            DataPlane::File
        );
        assert_eq!(
            VolumeParams::try_from(&params(&[("dataPlane", "nbd")]))
                .unwrap()
                .data_plane,
            DataPlane::Nbd
        );
        let err = VolumeParams::try_from(&params(&[("dataPlane", "iscsi")])).unwrap_err();
        assert!(err.to_string().contains("dataPlane"), "{err}");
    }

    #[test]
    fn migration_timeout_is_range_checked() {
        let ok = VolumeParams::try_from(&params(&[("migrationTimeoutSeconds", "900")])).unwrap();
        assert_eq!(ok.migration_timeout, Duration::from_secs(900));
        assert_eq!(ok.volume_context()["migrationTimeoutSeconds"], "900");
        for bad in ["29", "3601", "-1", "ten", ""] {
            let err =
                VolumeParams::try_from(&params(&[("migrationTimeoutSeconds", bad)])).unwrap_err();
            assert!(err.to_string().contains("migrationTimeoutSeconds"), "{err}");
        }
    }

    #[test]
    fn ctrl_loss_tmo_is_finite_and_bounded() {
        assert_eq!(
            VolumeParams::try_from(&params(&[])).unwrap().ctrl_loss_tmo,
            CTRL_LOSS_TMO_DEFAULT
        );
        let ok = VolumeParams::try_from(&params(&[("nvmeCtrlLossTmo", "120")])).unwrap();
        assert_eq!(ok.ctrl_loss_tmo, 120);
        for bad in ["-1", "0", "9", "86401", "forever"] {
            let err = VolumeParams::try_from(&params(&[("nvmeCtrlLossTmo", bad)])).unwrap_err();
            assert!(err.to_string().contains("infinite"), "{bad}: {err}");
        }
    }

    #[test]
    fn go_driver_keys_point_at_the_flags() {
        let err =
            VolumeParams::try_from(&params(&[("volumePath", "/storage-pool/k8s")])).unwrap_err();
        assert!(err.to_string().contains("--rds-volume-dir"), "{err}");
        let err = VolumeParams::try_from(&params(&[("nvmeAddress", "10.0.0.1")])).unwrap_err();
        assert!(err.to_string().contains("--rds-nvme-address"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = VolumeParams::try_from(&params(&[("replicas", "3")])).unwrap_err();
        assert_eq!(
            err,
            ParamError::Unknown {
                key: "replicas".into()
            }
        );
    }
}
