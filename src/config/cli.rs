//! The command line: the subcommands and their own flags (the server's flags are
//! `Config`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::nbd::{NbdClientArgs, NbdKeeperArgs, TargetArgs};
use super::{AttachmentStoreKind, Config};

/// handoff-csi: a CSI block-storage driver with safe attach tracking for KubeVirt live migration.
///
/// Without a subcommand it serves CSI. Every flag can also be set through the
/// environment variable shown in brackets.
#[derive(Debug, Clone, Parser)]
#[command(name = "handoff-csi", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub server: Config,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run a scenario on the embedded default in a temporary directory (needs root).
    Demo {
        #[command(subcommand)]
        scenario: DemoScenario,
    },
    /// Print the attachment table: volume, mode, nodes in order, migration start, time left.
    Attachments(AttachmentsArgs),
    /// Start and own the node's nbd-client processes for the node plugin (its own
    /// DaemonSet), so that they survive restarts of the plugin's container.
    NbdKeeper(NbdKeeperArgs),
    /// Run the NBD target on a storage host: serves published volumes' images and
    /// takes fence requests from the controller (`--nbd-target` there).
    Target(TargetArgs),
    /// Serve one NBD export as the file `disk` in a FUSE mount (started by the node
    /// plugin; the export name, which carries a secret, is read from standard input).
    NbdClient(NbdClientArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum DemoScenario {
    /// A KubeVirt-style live migration between two node plugins, with a data check.
    Migration {
        /// Number of 4 KiB checksummed blocks the VM writes and the target verifies.
        #[arg(long, default_value_t = 4096)]
        blocks: u64,
        /// A real VM instead: QEMU live-migrates a running guest (Debian's kernel and
        /// busybox) that verifies its disk round after round (needs qemu-system-x86,
        /// busybox-static, cpio, kmod; the kernel is fetched once with apt-get download).
        #[arg(long)]
        vm: bool,
        /// Live migrations of the VM (with --vm), alternating between the two nodes.
        #[arg(long, default_value_t = 2)]
        hops: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct AttachmentsArgs {
    /// Where to read the state from.
    #[arg(long, value_enum, default_value = "file")]
    pub store: AttachmentStoreKind,
    /// The controller's --state-dir (file store).
    #[arg(
        long,
        env = "HANDOFF_STATE_DIR",
        default_value = "/var/lib/handoff-csi/state"
    )]
    pub state_dir: PathBuf,
    /// The CSI driver name whose PersistentVolumes to read (kube store).
    #[arg(long, env = "HANDOFF_DRIVER_NAME", default_value = "handoff.csi.dev")]
    pub driver_name: String,
    /// `table` for people, `json` (one document, stable field names) for scripts.
    #[arg(long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}
