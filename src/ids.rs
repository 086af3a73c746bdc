//! Identifiers parsed at the gRPC edge. Nothing inside the driver takes a raw string
//! where one of these exists, so a volume id that reaches a path has been checked.

use std::fmt;

use serde::{Deserialize, Serialize};

/// CSI caps string fields at 128 bytes.
const MAX_ID_BYTES: usize = 128;
const VOLUME_PREFIX: &str = "vol-";
/// Volumes made by the Go RDS driver are named like their PersistentVolume.
const ADOPTED_PREFIX: &str = "pvc-";

/// Why an identifier from a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field} {value:?} is not valid: {reason}")]
    Malformed {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// Structurally plausible, but not an id this driver ever issued: no such object.
    #[error(
        "{field} {value:?} does not name a volume of this driver (ids look like vol-<32 hex>, or pvc-<uuid> for volumes adopted from the RDS Go driver)"
    )]
    Unknown { field: &'static str, value: String },
}

/// Shape check shared by every opaque id: bounded length and a conservative alphabet,
/// so nothing weird (NUL, '/', '..', unicode) travels further even into logs.
fn check_token(field: &'static str, raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Missing(field));
    }
    let malformed = |reason| IdError::Malformed {
        field,
        value: raw.chars().take(64).collect(),
        reason,
    };
    if raw.len() > MAX_ID_BYTES {
        return Err(malformed("longer than 128 bytes"));
    }
    if !raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(malformed(
            "only letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    if raw.starts_with('.') {
        return Err(malformed("must not start with '.'"));
    }
    Ok(())
}

/// A volume id issued by this driver: `vol-` followed by 32 lowercase hex digits, or
/// `pvc-` and a lowercase hyphenated UUID (the Go RDS driver's ids, kept on adoption and
/// used by the `rds` backend for PVs the provisioner names that way).
/// The strict shape is what makes it safe to use as a file name in the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

impl VolumeId {
    pub fn generate() -> Self {
        VolumeId(format!("{VOLUME_PREFIX}{}", uuid::Uuid::new_v4().simple()))
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_token("volume_id", raw)?;
        let hex = raw.strip_prefix(VOLUME_PREFIX).unwrap_or("");
        let ours = hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let adopted = raw.strip_prefix(ADOPTED_PREFIX).is_some_and(is_uuid);
        if ours || adopted {
            Ok(VolumeId(raw.to_owned()))
        } else {
            Err(IdError::Unknown {
                field: "volume_id",
                value: raw.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 128 bits in the id as a hyphenated UUID (namespace UUIDs of NVMe exports).
    pub fn uuid(&self) -> String {
        let hex: String = self.0[4..].chars().filter(|c| *c != '-').collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }
}

/// Lowercase hyphenated UUID text (8-4-4-4-12).
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

impl TryFrom<String> for VolumeId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        VolumeId::parse(&value)
    }
}

impl From<VolumeId> for String {
    fn from(id: VolumeId) -> Self {
        id.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// A snapshot id issued by this driver: `snap-` followed by 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

const SNAPSHOT_PREFIX: &str = "snap-";

impl SnapshotId {
    pub fn generate() -> Self {
        SnapshotId(format!(
            "{SNAPSHOT_PREFIX}{}",
            uuid::Uuid::new_v4().simple()
        ))
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_token("snapshot_id", raw)?;
        let hex = raw.strip_prefix(SNAPSHOT_PREFIX).unwrap_or("");
        let ours = hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        // The Go driver's snapshots: snap-<source uuid>-at-<unix time>, adopted as they are.
        let adopted = hex.split_once("-at-").is_some_and(|(uuid, at)| {
            is_uuid(uuid)
                && (1..=16).contains(&at.len())
                && at.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ours || adopted {
            Ok(SnapshotId(raw.to_owned()))
        } else {
            Err(IdError::Unknown {
                field: "snapshot_id",
                value: raw.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        SnapshotId::parse(&value)
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> Self {
        id.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// An opaque node id as returned by NodeGetInfo (a Kubernetes node name in a cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_token("node_id", raw)?;
        Ok(NodeId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        NodeId::parse(&value)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// The CO's idempotency key for CreateVolume. Any Unicode up to 128 bytes except the
/// control characters the CSI spec bans; it is never used in a path (the file backend
/// stores a hash of it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.is_empty() {
            return Err(IdError::Missing("name"));
        }
        let malformed = |reason| IdError::Malformed {
            field: "name",
            value: raw.chars().take(64).collect(),
            reason,
        };
        if raw.len() > MAX_ID_BYTES {
            return Err(malformed("longer than 128 bytes"));
        }
        let banned = |c: char| matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}');
        if raw.chars().any(banned) {
            return Err(malformed("contains a control character the CSI spec bans"));
        }
        Ok(VolumeName(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_volume_ids_round_trip() {
        let id = VolumeId::generate();
        assert_eq!(VolumeId::parse(id.as_str()).unwrap(), id);
        assert_eq!(id.as_str().len(), 36);
    }

    #[test]
    fn volume_id_rejects_hostile_input() {
        for bad in [
            "../../etc/passwd",
            "vol-/x",
            "a\0b",
            "vol-ü",
            &"v".repeat(129),
        ] {
            assert!(
                matches!(VolumeId::parse(bad), Err(IdError::Malformed { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(VolumeId::parse(""), Err(IdError::Missing("volume_id")));
        // Plausible but foreign ids are "not found", as csi-sanity expects.
        for foreign in ["some-vol-id", "vol-ABCDEF", "vol-0123", "..x"] {
            let err = VolumeId::parse(foreign).unwrap_err();
            assert!(
                matches!(err, IdError::Unknown { .. } | IdError::Malformed { .. }),
                "{foreign:?}"
            );
        }
        assert!(matches!(
            VolumeId::parse("some-vol-id"),
            Err(IdError::Unknown { .. })
        ));
        assert!(matches!(
            VolumeId::parse(&format!("vol-{}", "A".repeat(32))),
            Err(IdError::Unknown { .. })
        ));
    }

    #[test]
    fn go_driver_ids_are_accepted_and_checked() {
        let id = VolumeId::parse("pvc-3c6f1a2b-1111-4222-8333-944455556666").unwrap();
        assert_eq!(id.uuid(), "3c6f1a2b-1111-4222-8333-944455556666");
        let ours = VolumeId::parse(&format!("vol-{}", "ab".repeat(16))).unwrap();
        assert_eq!(ours.uuid(), "abababab-abab-abab-abab-abababababab");
        for bad in [
            "pvc-3c6f1a2b-1111-4222-8333-94445555666",
            "pvc-3C6F1A2B-1111-4222-8333-944455556666",
            "pvc-3c6f1a2b11114222833394445555666600",
            "pvc-",
            "pvc-../../etc/passwd-0000-0000-00000000",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_validates_volume_ids() {
        assert!(serde_json::from_str::<VolumeId>("\"../x\"").is_err());
        let id = VolumeId::generate();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<VolumeId>(&json).unwrap(), id);
    }

    #[test]
    fn snapshot_ids_are_distinct_from_volume_ids() {
        let s = SnapshotId::generate();
        assert_eq!(SnapshotId::parse(s.as_str()).unwrap(), s);
        assert!(matches!(
            VolumeId::parse(s.as_str()),
            Err(IdError::Unknown { .. })
        ));
        assert!(matches!(
            SnapshotId::parse(VolumeId::generate().as_str()),
            Err(IdError::Unknown { .. })
        ));
        assert!(matches!(
            SnapshotId::parse("../x"),
            Err(IdError::Malformed { .. })
        ));
    }

    #[test]
    fn node_ids() {
        assert!(NodeId::parse("worker-1.example.com").is_ok());
        assert!(NodeId::parse("node/../x").is_err());
        assert!(NodeId::parse("").is_err());
    }

    #[test]
    fn volume_names_follow_spec() {
        assert!(VolumeName::parse("pvc-1234 with spaces and ünïcode").is_ok());
        assert!(VolumeName::parse("tab\tand\nnewline are whitespace").is_ok());
        assert!(VolumeName::parse("bell\u{7}").is_err());
        assert!(VolumeName::parse("c1\u{85}").is_err());
        assert!(VolumeName::parse(&"n".repeat(129)).is_err());
        assert!(VolumeName::parse("").is_err());
    }
}
