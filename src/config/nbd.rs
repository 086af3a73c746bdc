//! The NBD data plane's processes: the storage-host target, the node's clients and the
//! keeper that owns them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{parse_duration, AttachmentStoreKind};

#[derive(Debug, Clone, Args)]
pub struct NbdKeeperArgs {
    /// Unix socket the node plugin's --nbd-keeper-socket points at (created 0600).
    #[arg(long, default_value = "/run/handoff-csi/nbd-keeper.sock")]
    pub socket: PathBuf,
    /// The node plugin's --nbd-run-dir: the only place clients are mounted.
    #[arg(long, default_value = "/run/handoff-csi/nbd")]
    pub run_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// NBD address nodes connect to (the controller's --nbd-advertise).
    #[arg(long, default_value = "0.0.0.0:10809")]
    pub listen: SocketAddr,
    /// Fence endpoint the controller calls (its --nbd-target); requests are signed
    /// with the export key.
    #[arg(long, default_value = "0.0.0.0:10810")]
    pub fence_listen: SocketAddr,
    /// The images: the `file` backend's data dir.
    #[arg(
        long,
        env = "HANDOFF_DATA_DIR",
        default_value = "/var/lib/handoff-csi/data"
    )]
    pub data_dir: PathBuf,
    /// Where the controller keeps attachment state: `file` (its --state-dir, on this
    /// host) or `kube` (PV annotations).
    #[arg(long, value_enum, default_value = "file")]
    pub attachment_store: AttachmentStoreKind,
    #[arg(
        long,
        env = "HANDOFF_STATE_DIR",
        default_value = "/var/lib/handoff-csi/state"
    )]
    pub state_dir: PathBuf,
    #[arg(long, env = "HANDOFF_DRIVER_NAME", default_value = "handoff.csi.dev")]
    pub driver_name: String,
    /// The controller's export key (same bytes as its --nbd-key-file).
    #[arg(long)]
    pub nbd_key_file: PathBuf,
}

/// Which NBD client a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NbdClientKind {
    Auto,
    Kernel,
    Fuse,
}

impl From<NbdClientKind> for crate::nbd::node::launch::ClientKind {
    fn from(kind: NbdClientKind) -> Self {
        use crate::nbd::node::launch::ClientKind;
        match kind {
            NbdClientKind::Auto => ClientKind::Auto,
            NbdClientKind::Kernel => ClientKind::Kernel,
            NbdClientKind::Fuse => ClientKind::Fuse,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct NbdClientArgs {
    /// host:port of the NBD target.
    #[arg(long)]
    pub address: String,
    /// Empty directory to mount the FUSE filesystem on.
    #[arg(long)]
    pub mountpoint: PathBuf,
    /// A request that cannot be completed (reconnecting as needed) within this time
    /// fails with EIO instead of hanging.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub io_timeout: Duration,
    /// Drive the kernel's nbd device (nbd.ko) under this backend identifier instead of
    /// serving a FUSE file; --mountpoint then names the supervisor's lock and state.
    #[arg(long)]
    pub kernel_backend: Option<String>,
    /// With --kernel-backend: a read-only device.
    #[arg(long)]
    pub read_only: bool,
}
