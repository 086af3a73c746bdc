//! The driver's error type and the one place errors become gRPC statuses.
//! Every variant is matched explicitly, so adding one forces a decision about its code.

use tonic::{Code, Status};

use crate::attachment::store::StoreError;
use crate::attachment::{state::PublishRefusal, AttachError};
use crate::backend::{BackendError, CapacityError};
use crate::capability::CapabilityError;
use crate::export::ExportError;
use crate::ids::{IdError, NodeId, VolumeId};
use crate::locks::Busy;
use crate::node::command::ToolError;
use crate::node::lifecycle::NodeError;
use crate::node::mount::MountError;
use crate::node::transport::TransportError;
use crate::params::ParamError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("{field} is not valid: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("volume {0} does not exist")]
    VolumeNotFound(VolumeId),
    #[error("volume {volume} is still published to {}; ControllerUnpublishVolume it first", join(.nodes))]
    VolumeInUse {
        volume: VolumeId,
        nodes: Vec<NodeId>,
    },
    #[error("volume {volume} was not created with this capability ({capability}); use one it was created with")]
    CapabilityNotOffered {
        volume: VolumeId,
        capability: String,
    },
    #[error("{0} is not implemented by this driver")]
    Unimplemented(&'static str),
    #[error("starting_token {0:?} was not issued by this driver or its entry is gone; list again from the start")]
    BadToken(String),
    #[error("the volume cannot be placed in the requested topology: this controller serves pool {pool:?}")]
    TopologyUnavailable { pool: String },
}

fn join(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(NodeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The message with every `source` in the chain, so the CO's event says why.
fn full_message(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

fn id_code(e: &IdError) -> Code {
    match e {
        IdError::Missing(_) | IdError::Malformed { .. } => Code::InvalidArgument,
        IdError::Unknown { .. } => Code::NotFound,
    }
}

fn capacity_code(e: &CapacityError) -> Code {
    match e {
        CapacityError::Negative { .. } => Code::InvalidArgument,
        CapacityError::Inverted { .. } | CapacityError::Unsatisfiable { .. } => Code::OutOfRange,
    }
}

fn backend_code(e: &BackendError) -> Code {
    match e {
        BackendError::NameConflict { .. } => Code::AlreadyExists,
        BackendError::Capacity(c) => capacity_code(c),
        BackendError::TooLarge { .. } => Code::OutOfRange,
        BackendError::NoSpace(_) => Code::ResourceExhausted,
        BackendError::NotFound(_) | BackendError::SnapshotNotFound(_) => Code::NotFound,
        BackendError::SnapshotNameConflict { .. } => Code::AlreadyExists,
        BackendError::SmallerThanSource { .. } | BackendError::Shrink { .. } => Code::OutOfRange,
        BackendError::NotAtomic(_) => Code::FailedPrecondition,
        BackendError::Io { .. } | BackendError::CorruptRecord { .. } => Code::Internal,
        BackendError::Unhealthy { .. } => Code::FailedPrecondition,
        BackendError::Target(_) => Code::Unavailable,
        BackendError::TargetRefused(_) => Code::FailedPrecondition,
        BackendError::PlaneNotServed(_) => Code::FailedPrecondition,
    }
}

fn store_code(e: &StoreError) -> Code {
    match e {
        // Nothing was persisted and nothing changed: the CO may retry.
        StoreError::Io { .. } | StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::Conflict { .. } | StoreError::Stale { .. } => Code::Aborted,
        StoreError::TooLarge(_) => Code::ResourceExhausted,
        // A person must look at the record: retrying changes nothing.
        StoreError::Corrupt { .. } | StoreError::Quarantined { .. } => Code::FailedPrecondition,
    }
}

fn attach_code(e: &AttachError) -> Code {
    match e {
        AttachError::Refused(r) => match r {
            PublishRefusal::HeldElsewhere { .. }
            | PublishRefusal::MigrationLimit { .. }
            | PublishRefusal::MigrationTimedOut { .. }
            | PublishRefusal::SharedWithOtherWorkloads { .. }
            | PublishRefusal::ModeMismatch { .. }
            | PublishRefusal::SingleWriter { .. }
            | PublishRefusal::Unfenced { .. }
            | PublishRefusal::RwoConflict { .. } => Code::FailedPrecondition,
            PublishRefusal::ReadOnlyRequired { .. } => Code::InvalidArgument,
            // CSI: published to this node already, but incompatibly.
            PublishRefusal::ReadonlyMismatch { .. }
            | PublishRefusal::PublishedDifferently { .. } => Code::AlreadyExists,
        },
        AttachError::Busy(_) => Code::Aborted,
        AttachError::Store(s) => store_code(s),
        // The Kubernetes API could not be asked: retry later.
        AttachError::Cluster(_) => Code::Unavailable,
        AttachError::UnknownNode(_) | AttachError::UnregisteredNode { .. } => Code::NotFound,
        // The target could not be reached or refused: nothing was freed, retry.
        AttachError::Fence(_) => Code::Unavailable,
        AttachError::Backend(e) => backend_code(e),
        // Another operation on the volume won the race: retry.
        AttachError::Withdrawn { .. } => Code::Aborted,
    }
}

fn tool_code(e: &ToolError) -> Code {
    match e {
        ToolError::NotInstalled { .. } => Code::FailedPrecondition,
        ToolError::TimedOut { .. } => Code::DeadlineExceeded,
        ToolError::Failed { .. } | ToolError::Spawn { .. } => Code::Internal,
    }
}

fn transport_code(e: &TransportError) -> Code {
    match e {
        TransportError::ForeignImage { .. } => Code::InvalidArgument,
        TransportError::ImageMissing(_) => Code::NotFound,
        TransportError::DirectIoUnavailable { .. } => Code::FailedPrecondition,
        TransportError::NoFreeDevice { .. } => Code::ResourceExhausted,
        TransportError::Unsupported(_) => Code::FailedPrecondition,
        // The target refused or cannot be reached: retryable.
        TransportError::NbdClient { .. } => Code::Unavailable,
        TransportError::ForeignSubsystem { .. } => Code::InvalidArgument,
        // The target may be unreachable for now: retryable.
        TransportError::NvmeConnect { .. } => Code::Unavailable,
        TransportError::Sys { .. } => Code::Internal,
        TransportError::DeviceBusy { .. } => Code::FailedPrecondition,
    }
}

fn capability_code(e: &CapabilityError) -> Code {
    match e {
        CapabilityError::Missing(_)
        | CapabilityError::UnsupportedMode(_)
        | CapabilityError::UnsupportedFsType(_)
        | CapabilityError::MultiWriterFilesystem { .. }
        | CapabilityError::BadMountFlag { .. }
        | CapabilityError::MountFlagsTooLarge
        | CapabilityError::MountGroupUnsupported => Code::InvalidArgument,
    }
}

fn param_code(e: &ParamError) -> Code {
    match e {
        ParamError::Unknown { .. } | ParamError::GoDriver { .. } | ParamError::Invalid { .. } => {
            Code::InvalidArgument
        }
    }
}

fn export_code(e: &ExportError) -> Code {
    match e {
        // Not a context ControllerPublish of this driver made.
        ExportError::MissingKey(_)
        | ExportError::Invalid { .. }
        | ExportError::UnknownTransport(_) => Code::InvalidArgument,
    }
}

fn node_code(e: &NodeError) -> Code {
    match e {
        NodeError::Busy(_) => Code::Aborted,
        NodeError::Transport(t) => transport_code(t),
        NodeError::Mount(m) => match m {
            MountError::Sys { .. } => Code::Internal,
            MountError::OutsideRoot { .. } => Code::FailedPrecondition,
            MountError::Tool(t) => tool_code(t),
            MountError::MissingCapability { .. } => Code::FailedPrecondition,
            // The device may become readable again (a network path): retry.
            MountError::Unreadable { .. } => Code::Unavailable,
        },
        NodeError::NotStaged(_) => Code::FailedPrecondition,
        NodeError::PathInUse { .. } => Code::AlreadyExists,
        NodeError::FilesystemMismatch { .. } => Code::FailedPrecondition,
        NodeError::StillPublished { .. } => Code::FailedPrecondition,
        NodeError::PathNotFound { .. } | NodeError::NotAtPath { .. } => Code::NotFound,
        NodeError::Io { .. } => Code::Internal,
    }
}

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::Id(e) => id_code(e),
            Error::Capability(e) => capability_code(e),
            Error::Capacity(e) => capacity_code(e),
            Error::Param(e) => param_code(e),
            Error::Export(e) => export_code(e),
            Error::Backend(e) => backend_code(e),
            Error::Attach(e) => attach_code(e),
            Error::Node(e) => node_code(e),
            Error::Busy(_) => Code::Aborted,
            Error::InvalidField { .. } => Code::InvalidArgument,
            Error::VolumeNotFound(_) => Code::NotFound,
            Error::VolumeInUse { .. } => Code::FailedPrecondition,
            Error::CapabilityNotOffered { .. } => Code::InvalidArgument,
            Error::Unimplemented(_) => Code::Unimplemented,
            // CSI: an invalid starting_token is ABORTED.
            Error::BadToken(_) => Code::Aborted,
            Error::TopologyUnavailable { .. } => Code::ResourceExhausted,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        Status::new(err.code(), full_message(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_csi_spec() {
        let v = VolumeId::generate();
        let n = NodeId::parse("a").unwrap();
        let cases: Vec<(Error, Code)> = vec![
            (IdError::Missing("volume_id").into(), Code::InvalidArgument),
            (
                IdError::Unknown {
                    field: "volume_id",
                    value: "x".into(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                AttachError::Refused(PublishRefusal::HeldElsewhere {
                    volume: v.clone(),
                    holder: n.clone(),
                })
                .into(),
                Code::FailedPrecondition,
            ),
            (
                Busy {
                    key: "volume x".into(),
                }
                .into(),
                Code::Aborted,
            ),
            (
                BackendError::Capacity(CapacityError::Unsatisfiable {
                    required: 1,
                    limit: 2,
                })
                .into(),
                Code::OutOfRange,
            ),
            (
                Error::VolumeInUse {
                    volume: v.clone(),
                    nodes: vec![n],
                },
                Code::FailedPrecondition,
            ),
            (NodeError::NotStaged(v).into(), Code::FailedPrecondition),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn messages_keep_the_source_chain() {
        let err: Error = BackendError::Io {
            op: "read",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        }
        .into();
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert!(
            status.message().contains("Input/output error"),
            "{}",
            status.message()
        );
    }
}
