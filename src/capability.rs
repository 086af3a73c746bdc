//! Typed volume capabilities, parsed from `csi::VolumeCapability` at the edge.

use serde::{Deserialize, Serialize};

use crate::csi;
use crate::csi::volume_capability::access_mode::Mode as CsiMode;

/// CSI caps the total size of mount_flags at 4 KiB.
const MAX_MOUNT_FLAGS_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("access mode {0} is not supported by this driver")]
    UnsupportedMode(i32),
    #[error("fsType {0:?} is not supported: use ext4 (default) or xfs")]
    UnsupportedFsType(String),
    #[error(
        "{mode:?} with a filesystem (mount) volume is refused: ext4/xfs are not cluster filesystems and mounting one on two nodes corrupts it; use volumeMode: Block for multi-node writers (KubeVirt live migration)"
    )]
    MultiWriterFilesystem { mode: AccessMode },
    #[error("mount flag {flag:?} is not allowed: {reason}")]
    BadMountFlag { flag: String, reason: &'static str },
    #[error("mount_flags exceed the 4 KiB the CSI spec allows")]
    MountFlagsTooLarge,
    #[error(
        "volume_mount_group is not supported (the driver does not advertise VOLUME_MOUNT_GROUP)"
    )]
    MountGroupUnsupported,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Block,
    Mount { fs_type: FsType, flags: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

/// How many nodes may hold a volume at once: the attach rules key off this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sharing {
    /// One node (ReadWriteOnce and single-node read-only).
    Rwo,
    /// Up to two nodes, block only: the source and target of a live migration.
    Rwx,
    /// Any number of nodes, every publish read-only.
    Rox,
}

impl Sharing {
    /// How many nodes may hold a volume at once.
    pub fn max_nodes(self) -> usize {
        match self {
            Sharing::Rwo => 1,
            Sharing::Rwx => 2,
            Sharing::Rox => usize::MAX,
        }
    }
}

impl AccessMode {
    pub fn sharing(self) -> Sharing {
        match self {
            AccessMode::SingleNodeWriter | AccessMode::SingleNodeReaderOnly => Sharing::Rwo,
            AccessMode::MultiNodeReaderOnly => Sharing::Rox,
            AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter => Sharing::Rwx,
        }
    }

    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    fn from_csi(raw: i32) -> Result<Self, CapabilityError> {
        match CsiMode::try_from(raw) {
            Ok(CsiMode::SingleNodeWriter)
            | Ok(CsiMode::SingleNodeSingleWriter)
            | Ok(CsiMode::SingleNodeMultiWriter) => Ok(AccessMode::SingleNodeWriter),
            Ok(CsiMode::SingleNodeReaderOnly) => Ok(AccessMode::SingleNodeReaderOnly),
            Ok(CsiMode::MultiNodeReaderOnly) => Ok(AccessMode::MultiNodeReaderOnly),
            Ok(CsiMode::MultiNodeSingleWriter) => Ok(AccessMode::MultiNodeSingleWriter),
            Ok(CsiMode::MultiNodeMultiWriter) => Ok(AccessMode::MultiNodeMultiWriter),
            Ok(CsiMode::Unknown) => Err(CapabilityError::Missing("volume_capability.access_mode")),
            Err(_) => Err(CapabilityError::UnsupportedMode(raw)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }
}

impl TryFrom<&csi::VolumeCapability> for Capability {
    type Error = CapabilityError;

    fn try_from(cap: &csi::VolumeCapability) -> Result<Self, Self::Error> {
        let mode = cap
            .access_mode
            .as_ref()
            .ok_or(CapabilityError::Missing("volume_capability.access_mode"))
            .and_then(|m| AccessMode::from_csi(m.mode))?;
        let access_type = match &cap.access_type {
            None => return Err(CapabilityError::Missing("volume_capability.access_type")),
            Some(csi::volume_capability::AccessType::Block(_)) => AccessType::Block,
            Some(csi::volume_capability::AccessType::Mount(m)) => parse_mount(m)?,
        };
        if matches!(access_type, AccessType::Mount { .. }) && mode.sharing() == Sharing::Rwx {
            return Err(CapabilityError::MultiWriterFilesystem { mode });
        }
        Ok(Capability { access_type, mode })
    }
}

fn parse_mount(m: &csi::volume_capability::MountVolume) -> Result<AccessType, CapabilityError> {
    if !m.volume_mount_group.is_empty() {
        return Err(CapabilityError::MountGroupUnsupported);
    }
    let fs_type = match m.fs_type.as_str() {
        "" | "ext4" => FsType::Ext4,
        "xfs" => FsType::Xfs,
        other => {
            return Err(CapabilityError::UnsupportedFsType(
                other.chars().take(32).collect(),
            ))
        }
    };
    if m.mount_flags.iter().map(String::len).sum::<usize>() > MAX_MOUNT_FLAGS_BYTES {
        return Err(CapabilityError::MountFlagsTooLarge);
    }
    for flag in &m.mount_flags {
        check_mount_flag(flag)?;
    }
    Ok(AccessType::Mount {
        fs_type,
        flags: m.mount_flags.clone(),
    })
}

fn check_mount_flag(flag: &str) -> Result<(), CapabilityError> {
    let bad = |reason| {
        Err(CapabilityError::BadMountFlag {
            flag: flag.chars().take(64).collect(),
            reason,
        })
    };
    if flag.is_empty() {
        return bad("empty");
    }
    if flag.bytes().any(|b| b == b',' || b.is_ascii_control()) {
        return bad("one option per entry, without commas or control characters");
    }
    // These would turn a filesystem mount into something else entirely.
    if matches!(
        flag,
        "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "slave" | "private"
    ) {
        return bad("the driver decides bind/propagation itself");
    }
    Ok(())
}

/// Parses every capability of a request (CreateVolume, ValidateVolumeCapabilities).
pub fn parse_all(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>, CapabilityError> {
    if caps.is_empty() {
        return Err(CapabilityError::Missing("volume_capabilities"));
    }
    caps.iter().map(Capability::try_from).collect()
}

/// Parses the single capability of publish/stage requests.
pub fn parse_one(cap: Option<&csi::VolumeCapability>) -> Result<Capability, CapabilityError> {
    cap.ok_or(CapabilityError::Missing("volume_capability"))
        .and_then(Capability::try_from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode as CsiAccessMode, BlockVolume, MountVolume};

    fn cap(mode: CsiMode, block: bool, fs: &str) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(if block {
                csi::volume_capability::AccessType::Block(BlockVolume {})
            } else {
                csi::volume_capability::AccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                })
            }),
            access_mode: Some(CsiAccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn rwx_block_is_allowed_rwx_mount_is_not() {
        let c = Capability::try_from(&cap(CsiMode::MultiNodeMultiWriter, true, "")).unwrap();
        assert_eq!(c.mode.sharing(), Sharing::Rwx);
        assert!(matches!(
            Capability::try_from(&cap(CsiMode::MultiNodeMultiWriter, false, "")),
            Err(CapabilityError::MultiWriterFilesystem { .. })
        ));
        assert!(matches!(
            Capability::try_from(&cap(CsiMode::MultiNodeSingleWriter, false, "ext4")),
            Err(CapabilityError::MultiWriterFilesystem { .. })
        ));
    }

    #[test]
    fn rox_mount_is_allowed() {
        let c = Capability::try_from(&cap(CsiMode::MultiNodeReaderOnly, false, "xfs")).unwrap();
        assert_eq!(c.mode.sharing(), Sharing::Rox);
        assert!(c.mode.is_read_only());
    }

    #[test]
    fn fs_types() {
        let c = Capability::try_from(&cap(CsiMode::SingleNodeWriter, false, "")).unwrap();
        assert_eq!(
            c.access_type,
            AccessType::Mount {
                fs_type: FsType::Ext4,
                flags: vec![]
            }
        );
        assert!(matches!(
            Capability::try_from(&cap(CsiMode::SingleNodeWriter, false, "ntfs")),
            Err(CapabilityError::UnsupportedFsType(_))
        ));
    }

    #[test]
    fn missing_parts() {
        let mut c = cap(CsiMode::SingleNodeWriter, true, "");
        c.access_mode = None;
        assert!(matches!(
            Capability::try_from(&c),
            Err(CapabilityError::Missing(_))
        ));
        let c = cap(CsiMode::Unknown, true, "");
        assert!(matches!(
            Capability::try_from(&c),
            Err(CapabilityError::Missing(_))
        ));
        let mut c = cap(CsiMode::SingleNodeWriter, true, "");
        c.access_type = None;
        assert!(Capability::try_from(&c).is_err());
        assert!(parse_all(&[]).is_err());
        assert!(parse_one(None).is_err());
        let mut c = cap(CsiMode::SingleNodeWriter, true, "");
        c.access_mode = Some(CsiAccessMode { mode: 99 });
        assert_eq!(
            Capability::try_from(&c),
            Err(CapabilityError::UnsupportedMode(99))
        );
    }

    #[test]
    fn mount_flags_are_checked() {
        let mut c = cap(CsiMode::SingleNodeWriter, false, "ext4");
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            m.mount_flags = vec!["noatime".into(), "bind".into()];
        }
        assert!(matches!(
            Capability::try_from(&c),
            Err(CapabilityError::BadMountFlag { .. })
        ));
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            m.mount_flags = vec!["noatime,ro".into()];
        }
        assert!(Capability::try_from(&c).is_err());
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            m.mount_flags = vec!["noatime".into(), "discard".into()];
        }
        assert!(Capability::try_from(&c).is_ok());
    }
}
