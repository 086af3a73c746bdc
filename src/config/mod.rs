//! Command-line and environment configuration: the server's flags (`Config`) and their
//! checks here; the subcommands in `cli`, the backends' flags and settings in `backend`,
//! the NBD processes' in `nbd`.

mod backend;
mod cli;
mod nbd;

pub use backend::{NvmeArgs, RdsArgs};
pub use cli::{AttachmentsArgs, Cli, Command, DemoScenario, OutputFormat};
pub use nbd::{NbdClientArgs, NbdClientKind, NbdKeeperArgs, TargetArgs};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

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
    use clap::Parser;

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
