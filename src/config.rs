//! Command-line and environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::ids::NodeId;

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity + Controller: volume lifecycle and attach tracking.
    Controller,
    /// Identity + Node: loop devices, filesystems and mounts on this host.
    Node,
    /// Everything in one process: the embedded single-machine default.
    All,
}

impl Mode {
    pub fn serves_controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    pub fn serves_node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Sparse raw images in --data-dir (node-local or a shared filesystem).
    File,
    /// A MikroTik RouterOS storage server (RDS) over SSH; nodes reach volumes over
    /// NVMe/TCP. See the --rds-* flags.
    Rds,
    /// The images of --data-dir exported by this host's Linux NVMe target (nvmet),
    /// admitting only the nodes a volume is published to. See the --nvmet-* flags.
    Nvmet,
}

/// Where the controller keeps attachment state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachmentStoreKind {
    /// JSON files in --state-dir (no Kubernetes).
    File,
    /// PersistentVolume annotations, cross-checked with VolumeAttachments and Nodes.
    Kube,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

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

impl From<NbdClientKind> for crate::nbd::launch::ClientKind {
    fn from(kind: NbdClientKind) -> Self {
        use crate::nbd::launch::ClientKind;
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

/// Flags of the CSI server.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Which CSI services to serve.
    #[arg(long, env = "HANDOFF_MODE", value_enum, default_value = "all")]
    pub mode: Mode,

    /// gRPC endpoint: unix:///path/to/csi.sock, or tcp://host:port for debugging only.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/handoff-csi/csi.sock"
    )]
    pub endpoint: Endpoint,

    /// Node ID reported by NodeGetInfo (defaults to the host name).
    #[arg(long, env = "HANDOFF_NODE_ID")]
    pub node_id: Option<String>,

    /// CSI driver name reported by GetPluginInfo.
    #[arg(long, env = "HANDOFF_DRIVER_NAME", default_value = "handoff.csi.dev")]
    pub driver_name: String,

    /// Storage backend.
    #[arg(long, env = "HANDOFF_BACKEND", value_enum, default_value = "file")]
    pub backend: BackendKind,

    /// Directory holding the volume images (file backend). Must be the same path on every
    /// node when it is a shared filesystem.
    #[arg(
        long,
        env = "HANDOFF_DATA_DIR",
        default_value = "/var/lib/handoff-csi/data"
    )]
    pub data_dir: PathBuf,

    /// Directory for this process's durable state (attachment records without Kubernetes).
    #[arg(
        long,
        env = "HANDOFF_STATE_DIR",
        default_value = "/var/lib/handoff-csi/state"
    )]
    pub state_dir: PathBuf,

    /// Where attachment state lives: `file` without Kubernetes, `kube` in a cluster
    /// (uses the in-cluster service account or $KUBECONFIG).
    #[arg(
        long,
        env = "HANDOFF_ATTACHMENT_STORE",
        value_enum,
        default_value = "file"
    )]
    pub attachment_store: AttachmentStoreKind,

    /// Address for /metrics, /healthz and /readyz (disabled when unset).
    #[arg(long, env = "HANDOFF_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log output format.
    #[arg(long, env = "HANDOFF_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `handoff_csi=debug,tower=warn`.
    #[arg(long, env = "HANDOFF_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Permissions of the Unix socket (octal). 0600 lets only the owner (root) connect;
    /// 0660 also admits the socket's group (a sidecar running as another user).
    #[arg(long, env = "HANDOFF_SOCKET_MODE", default_value = "0600", value_parser = parse_socket_mode)]
    pub socket_mode: u32,

    /// How long a detached RWO holder is remembered, so that a pod moving to another node
    /// is recorded as a hand-off (0 disables). Never allows two RWO nodes at once.
    #[arg(long, env = "HANDOFF_ATTACH_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub attach_grace_period: Duration,

    /// How often the controller re-checks attachments: overdue migrations, expired
    /// records, nodes or VolumeAttachments that disappeared.
    #[arg(long, env = "HANDOFF_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// Namespace of the driver's own Lease (`handoff-csi-background`): with several
    /// controller replicas only its holder runs the reconciler.
    #[arg(long, env = "HANDOFF_LEASE_NAMESPACE", default_value = "handoff-csi")]
    pub lease_namespace: String,

    /// This replica's name in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    pub lease_identity: String,

    /// How long the Lease lasts without renewal (renewed every third of it).
    #[arg(long, env = "HANDOFF_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Let pods of different workloads share an RWX block volume across nodes. Off by
    /// default: a second node is attached only for a live migration of the VM already
    /// using the disk. Turn on only when the pods run a cluster filesystem on it.
    #[arg(long, env = "HANDOFF_ALLOW_RWX_BLOCK_SHARING", default_value_t = false)]
    pub allow_rwx_block_sharing: bool,

    /// KubeVirt's completionTimeoutPerGiB, for migrations whose VMI does not report its
    /// effective migration configuration; keep it equal to the KubeVirt CR's value.
    #[arg(long, env = "HANDOFF_KUBEVIRT_COMPLETION_TIMEOUT_PER_GIB", default_value_t = 150, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub kubevirt_completion_timeout_per_gib: u64,

    /// Serve published volumes over NBD on this address (controller), and fence a node
    /// at this target when it loses an attachment. Off by default.
    #[arg(long, env = "HANDOFF_NBD_LISTEN")]
    pub nbd_listen: Option<SocketAddr>,

    /// Fence endpoint (host:port) of a `handoff-csi target` on a storage host, used
    /// instead of a target in this process (--nbd-listen); needs --nbd-advertise and the
    /// target's key in --nbd-key-file.
    #[arg(long, env = "HANDOFF_NBD_TARGET")]
    pub nbd_target: Option<String>,

    /// host:port nodes dial for NBD (default: --nbd-listen; required when that is a
    /// wildcard address).
    #[arg(long, env = "HANDOFF_NBD_ADVERTISE")]
    pub nbd_advertise: Option<String>,

    /// The key that signs per-attachment NBD export names (32 bytes; created 0600 when
    /// missing). Controller replicas serving the same exports must share it.
    #[arg(long, env = "HANDOFF_NBD_KEY_FILE")]
    pub nbd_key_file: Option<PathBuf>,

    /// Node: where the NBD plane mounts each volume's FUSE disk (`<dir>/<volume>/disk`);
    /// local to the node, e.g. under /run.
    #[arg(
        long,
        env = "HANDOFF_NBD_RUN_DIR",
        default_value = "/run/handoff-csi/nbd"
    )]
    pub nbd_run_dir: PathBuf,

    /// Node: ask the `handoff-csi nbd-keeper` on this socket to start nbd-clients, so
    /// that they outlive this plugin's container (default: start them directly).
    #[arg(long, env = "HANDOFF_NBD_KEEPER_SOCKET")]
    pub nbd_keeper_socket: Option<PathBuf>,

    /// Node: an NBD request that cannot complete within this time (reconnecting as
    /// needed) fails with EIO instead of hanging the VM's I/O forever.
    #[arg(long, env = "HANDOFF_NBD_IO_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub nbd_io_timeout: Duration,

    /// Node: how NBD-plane volumes become block devices: the kernel's nbd driver, FUSE +
    /// a loop device, or `auto` (the kernel's when nbd.ko is there, FUSE otherwise).
    #[arg(long, env = "HANDOFF_NBD_CLIENT", value_enum, default_value_t = NbdClientKind::Auto)]
    pub nbd_client: NbdClientKind,

    /// Topology pool this driver serves: nodes that reach the same data dir share a pool
    /// (reported as topology.handoff.csi.dev/pool; CreateVolume honours it).
    #[arg(long, env = "HANDOFF_TOPOLOGY_POOL", default_value = "default")]
    pub topology_pool: String,

    /// Without Kubernetes (`--attachment-store file`): where node plugins register their
    /// node id and the controller looks up the node a ControllerPublish names; shared by
    /// every node when they are separate machines. Default: <data-dir>/.nodes.
    #[arg(long, env = "HANDOFF_NODE_REGISTRY")]
    pub node_registry: Option<PathBuf>,

    /// Kubelet's root directory: staging and target paths outside it are refused.
    #[arg(long, env = "HANDOFF_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// Most NodeStage calls doing mkfs/mount work at once on this node; others wait.
    #[arg(long, env = "HANDOFF_MAX_CONCURRENT_STAGE", default_value_t = 4)]
    pub max_concurrent_stage: usize,

    /// Timeout for external tools (mkfs, blkid).
    #[arg(long, env = "HANDOFF_TOOL_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub tool_timeout: Duration,

    #[command(flatten)]
    pub rds: RdsArgs,

    #[command(flatten)]
    pub nvme: NvmeArgs,
}

/// `--backend rds`: the RouterOS storage server.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "RDS backend (MikroTik RouterOS)")]
pub struct RdsArgs {
    /// SSH address of the router, host:port.
    #[arg(long, env = "HANDOFF_RDS_ADDRESS")]
    pub rds_address: Option<String>,
    /// SSH user on the router.
    #[arg(long, env = "HANDOFF_RDS_USER", default_value = "admin")]
    pub rds_user: String,
    /// OpenSSH private key file for the login.
    #[arg(long, env = "HANDOFF_RDS_KEY_FILE")]
    pub rds_key_file: Option<PathBuf>,
    /// File holding the login password (instead of a key).
    #[arg(long, env = "HANDOFF_RDS_PASSWORD_FILE")]
    pub rds_password_file: Option<PathBuf>,
    /// The router's SSH host key: an OpenSSH public key line or its SHA256:
    /// fingerprint (repeat the flag to pin several, e.g. during a key rotation).
    #[arg(long, env = "HANDOFF_RDS_HOST_KEY", value_delimiter = '\n')]
    pub rds_host_key: Vec<String>,
    /// Talk to whatever answers at --rds-address: anyone on the network path can then
    /// pose as the router and take the credentials. For a lab only.
    #[arg(
        long,
        env = "HANDOFF_RDS_INSECURE_SKIP_HOST_KEY_CHECK",
        default_value_t = false
    )]
    pub rds_insecure_skip_host_key_check: bool,
    /// Directory of the volume images on the router; its first component is the disk
    /// whose free space GetCapacity reports.
    #[arg(
        long,
        env = "HANDOFF_RDS_VOLUME_DIR",
        default_value = "/storage-pool/kubernetes-volumes"
    )]
    pub rds_volume_dir: String,
    /// Address nodes connect to over NVMe/TCP (default: the host of --rds-address).
    #[arg(long, env = "HANDOFF_RDS_NVME_ADDRESS")]
    pub rds_nvme_address: Option<String>,
    /// NVMe/TCP port new volumes are exported on.
    #[arg(long, env = "HANDOFF_RDS_NVME_PORT", default_value_t = 4420)]
    pub rds_nvme_port: u16,
    /// Bound on connecting and on each RouterOS command.
    #[arg(long, env = "HANDOFF_RDS_COMMAND_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub rds_command_timeout: Duration,
    /// Attempts per command when the failure may pass (busy router, dropped session).
    #[arg(long, env = "HANDOFF_RDS_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub rds_attempts: u32,
}

/// `--backend nvmet` (controller on the storage host) and the node's NVMe/TCP transport.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "NVMe/TCP (nvmet backend and node transport)")]
pub struct NvmeArgs {
    /// Controller: nvmet's directory in configfs.
    #[arg(
        long,
        env = "HANDOFF_NVMET_CONFIGFS",
        default_value = "/sys/kernel/config/nvmet"
    )]
    pub nvmet_configfs: PathBuf,
    /// Controller: address of this host that nodes connect to (the nvmet port's traddr).
    #[arg(long, env = "HANDOFF_NVMET_ADDRESS")]
    pub nvmet_address: Option<std::net::IpAddr>,
    /// Controller: TCP port of the nvmet port.
    #[arg(long, env = "HANDOFF_NVMET_PORT", default_value_t = 4420)]
    pub nvmet_port: u16,
    /// Controller: id of the nvmet port directory this driver owns.
    #[arg(long, env = "HANDOFF_NVMET_PORT_ID", default_value_t = 1)]
    pub nvmet_port_id: u16,
    /// Controller: drive nvmet on this storage host (host:port) over SSH instead of this
    /// host's configfs; --data-dir must then be that host's data dir, mounted at the
    /// same path here.
    #[arg(long, env = "HANDOFF_NVMET_SSH_ADDRESS")]
    pub nvmet_ssh_address: Option<String>,
    /// Controller: SSH user on the storage host (needs write access to its configfs).
    #[arg(long, env = "HANDOFF_NVMET_SSH_USER", default_value = "root")]
    pub nvmet_ssh_user: String,
    /// Controller: OpenSSH private key for the storage host.
    #[arg(long, env = "HANDOFF_NVMET_SSH_KEY_FILE")]
    pub nvmet_ssh_key_file: Option<PathBuf>,
    /// Controller: the storage host's SSH host key (key line or SHA256: fingerprint);
    /// repeat to pin several.
    #[arg(long, env = "HANDOFF_NVMET_SSH_HOST_KEY", value_delimiter = '\n')]
    pub nvmet_ssh_host_key: Vec<String>,
    /// Subsystem NQNs of nvmet volumes are this prefix and the volume id; nodes touch
    /// no NVMe subsystem outside it (or RouterOS's prefix for rds volumes).
    #[arg(
        long,
        env = "HANDOFF_NVME_NQN_PREFIX",
        default_value = "nqn.2026-11.dev.handoff-csi:"
    )]
    pub nvme_nqn_prefix: String,
    /// Node: where the node's own NVMe host NQN and ID are kept when /etc/nvme has none
    /// (default: <state-dir>/nvme).
    #[arg(long, env = "HANDOFF_NVME_HOST_DIR")]
    pub nvme_host_dir: Option<PathBuf>,
    /// Node: how long a connected namespace may take to appear.
    #[arg(long, env = "HANDOFF_NVME_CONNECT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub nvme_connect_timeout: Duration,
}

impl Config {
    /// The node registry in use: only without Kubernetes (nodes are Node objects there).
    pub fn registry(&self) -> Option<crate::registry::NodeRegistry> {
        (self.attachment_store == AttachmentStoreKind::File).then(|| {
            crate::registry::NodeRegistry::new(
                self.node_registry
                    .clone()
                    .unwrap_or_else(|| crate::registry::NodeRegistry::default_dir(&self.data_dir)),
            )
        })
    }

    /// Checks that cannot be expressed as clap value parsers; returns the node id to use.
    pub fn validate(&self) -> Result<NodeId, String> {
        let raw = match &self.node_id {
            Some(id) => id.clone(),
            None => nix::unistd::gethostname()
                .map_err(|e| format!("cannot read host name for --node-id: {e}"))?
                .to_string_lossy()
                .into_owned(),
        };
        let node_id = NodeId::parse(&raw).map_err(|e| format!("--node-id: {e}"))?;
        if !is_valid_driver_name(&self.driver_name) {
            return Err(format!(
                "--driver-name {:?} must be at most 63 characters of [a-zA-Z0-9.-], beginning and ending with an alphanumeric character",
                self.driver_name
            ));
        }
        let pool = &self.topology_pool;
        if pool.is_empty()
            || pool.len() > 63
            || !pool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!("--topology-pool {pool:?} must be a Kubernetes label value (1-63 of [A-Za-z0-9._-])"));
        }
        if self.nbd_listen.is_some() && self.nbd_target.is_some() {
            return Err("--nbd-listen (a target in this process) and --nbd-target (a target on another host) exclude each other".into());
        }
        if self.nbd_target.is_some() && self.nbd_advertise.is_none() {
            return Err("--nbd-target needs --nbd-advertise: the NBD address of that target, which nodes dial".into());
        }
        if let (Some(listen), None) = (self.nbd_listen, &self.nbd_advertise) {
            if listen.ip().is_unspecified() {
                return Err(format!("--nbd-listen {listen} is a wildcard address: set --nbd-advertise to the host:port nodes should dial"));
            }
        }
        self.validate_backend()?;
        if self.reconcile_interval.is_zero() {
            return Err("--reconcile-interval must be greater than 0".into());
        }
        if self.lease_duration < Duration::from_secs(3) {
            return Err("--lease-duration must be at least 3s (it is renewed every third)".into());
        }
        for (flag, dir) in [
            ("--data-dir", &self.data_dir),
            ("--state-dir", &self.state_dir),
        ] {
            if !dir.is_absolute() {
                return Err(format!("{flag} must be an absolute path, got {dir:?}"));
            }
        }
        Ok(node_id)
    }
}

impl Config {
    fn validate_backend(&self) -> Result<(), String> {
        let nqn_ok = |p: &str| {
            p.starts_with("nqn.")
                && p.ends_with(':')
                && p.len() <= 100
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        };
        if !nqn_ok(&self.nvme.nvme_nqn_prefix) {
            return Err(format!("--nvme-nqn-prefix {:?} must look like nqn.2026-11.com.example:csi: (letters, digits, . - :, ending in ':')", self.nvme.nvme_nqn_prefix));
        }
        match self.backend {
            BackendKind::File => Ok(()),
            BackendKind::Nvmet => {
                if !self.mode.serves_controller() {
                    return Ok(());
                }
                let n = &self.nvme;
                if n.nvmet_address.is_none() {
                    return Err("--backend nvmet needs --nvmet-address: the target host's address that nodes connect to over NVMe/TCP".into());
                }
                if n.nvmet_ssh_address.is_some() {
                    if n.nvmet_ssh_key_file.is_none() {
                        return Err("--nvmet-ssh-address needs --nvmet-ssh-key-file".into());
                    }
                    if n.nvmet_ssh_host_key.is_empty() {
                        return Err("--nvmet-ssh-address needs --nvmet-ssh-host-key (the storage host's SSH host key, checked on that host)".into());
                    }
                    for key in &n.nvmet_ssh_host_key {
                        key.parse::<crate::backend::ssh::HostKeyPin>()
                            .map_err(|e| format!("--nvmet-ssh-host-key {key:?}: {e}"))?;
                    }
                }
                Ok(())
            }
            BackendKind::Rds => {
                if !self.mode.serves_controller() {
                    return Ok(());
                }
                let r = &self.rds;
                if r.rds_address.is_none() {
                    return Err(
                        "--backend rds needs --rds-address (the router's SSH host:port)".into(),
                    );
                }
                match (&r.rds_key_file, &r.rds_password_file) {
                    (None, None) => {
                        return Err(
                            "--backend rds needs --rds-key-file or --rds-password-file".into()
                        )
                    }
                    (Some(_), Some(_)) => {
                        return Err(
                            "--rds-key-file and --rds-password-file exclude each other".into()
                        )
                    }
                    _ => {}
                }
                if r.rds_host_key.is_empty() && !r.rds_insecure_skip_host_key_check {
                    return Err("--backend rds needs --rds-host-key (the router's SSH host key, from `/ip ssh export` or ssh-keyscan, checked on its console); --rds-insecure-skip-host-key-check turns verification off for a lab".into());
                }
                for key in &r.rds_host_key {
                    key.parse::<crate::backend::ssh::HostKeyPin>()
                        .map_err(|e| format!("--rds-host-key {key:?}: {e}"))?;
                }
                let dir_ok = r.rds_volume_dir.starts_with('/')
                    && r.rds_volume_dir.len() > 1
                    && !r.rds_volume_dir.contains("..")
                    && r.rds_volume_dir.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.')
                    });
                if !dir_ok {
                    return Err(format!("--rds-volume-dir {:?} must be an absolute router path of letters, digits and / - _ .", r.rds_volume_dir));
                }
                Ok(())
            }
        }
    }
}

/// CSI GetPluginInfo: domain-name notation, 63 characters or less.
fn is_valid_driver_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
}

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "unix endpoint needs an absolute path (unix:///run/csi.sock), got {s:?}"
                ));
            }
            Ok(Endpoint::Unix(path))
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            addr.parse()
                .map(Endpoint::Tcp)
                .map_err(|e| format!("tcp endpoint {s:?}: {e} (expected tcp://127.0.0.1:10000)"))
        } else {
            Err(format!("endpoint {s:?} must start with unix:// or tcp://"))
        }
    }
}

fn default_identity() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "handoff-csi".into())
}

fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("{s:?} is not an octal mode: {e}"))?;
    if mode & 0o007 != 0 {
        return Err(format!(
            "socket mode {s} would let any local user drive the storage driver; use 0600 or 0660"
        ));
    }
    if mode & !0o770 != 0 {
        return Err(format!(
            "socket mode {s}: only read/write bits for owner and group are allowed"
        ));
    }
    Ok(mode)
}

/// Accepts `30s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 30s, 500ms, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_and_server_flags_parse() {
        let cli = Cli::try_parse_from(["handoff-csi", "--mode", "node"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.server.mode, Mode::Node);
        let cli =
            Cli::try_parse_from(["handoff-csi", "demo", "migration", "--blocks", "8"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Demo {
                scenario: DemoScenario::Migration {
                    blocks: 8,
                    vm: false,
                    hops: 2
                }
            })
        ));
        let cli = Cli::try_parse_from(["handoff-csi", "attachments", "--state-dir", "/x"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Attachments(a)) if a.state_dir == std::path::Path::new("/x"))
        );
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:///run/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/csi.sock".into())
        );
        assert!("unix://relative.sock".parse::<Endpoint>().is_err());
        assert!(matches!(
            "tcp://127.0.0.1:9000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp(_)
        ));
        assert!("http://x".parse::<Endpoint>().is_err());
    }

    #[test]
    fn socket_mode_refuses_world_access() {
        assert_eq!(parse_socket_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_socket_mode("0660").unwrap(), 0o660);
        assert!(parse_socket_mode("0666").is_err());
        assert!(parse_socket_mode("4770").is_err());
        assert!(parse_socket_mode("abc").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("7d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn driver_names() {
        assert!(is_valid_driver_name("handoff.csi.dev"));
        assert!(!is_valid_driver_name("-handoff"));
        assert!(!is_valid_driver_name(&"a".repeat(64)));
        assert!(!is_valid_driver_name("handoff_csi"));
    }
}
