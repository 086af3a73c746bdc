//! The backends' flags, and the typed settings they become (`BackendSettings`), checked
//! once.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{parse_duration, BackendKind, Config};
use crate::backend::nvmet::PortConfig;
use crate::backend::open::{
    BackendSettings, NvmetSettings, RdsOpenSettings, SshLogin, SshSettings,
};
use crate::backend::rds::RdsSettings;
use crate::backend::ssh::{HostKeyPin, HostKeyPolicy};

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

/// `--nvme-nqn-prefix` (the nvmet backend and the node's transport both use it).
fn nqn_prefix_ok(p: &str) -> bool {
    p.starts_with("nqn.")
        && p.ends_with(':')
        && p.len() <= 100
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
}

fn host_keys(flag: &str, keys: &[String]) -> Result<Vec<HostKeyPin>, String> {
    keys.iter()
        .map(|key| key.parse().map_err(|e| format!("{flag} {key:?}: {e}")))
        .collect()
}

impl Config {
    /// The flags every mode needs; a controller's backend is checked by building its
    /// settings.
    pub(super) fn validate_backend(&self) -> Result<(), String> {
        if !nqn_prefix_ok(&self.nvme.nvme_nqn_prefix) {
            return Err(format!("--nvme-nqn-prefix {:?} must look like nqn.2026-11.com.example:csi: (letters, digits, . - :, ending in ':')", self.nvme.nvme_nqn_prefix));
        }
        if self.mode.serves_controller() {
            BackendSettings::try_from(self)?;
        }
        Ok(())
    }
}

impl TryFrom<&Config> for NvmetSettings {
    type Error = String;

    fn try_from(config: &Config) -> Result<Self, String> {
        let n = &config.nvme;
        let address = n.nvmet_address.ok_or("--backend nvmet needs --nvmet-address: the target host's address that nodes connect to over NVMe/TCP")?;
        let ssh = match &n.nvmet_ssh_address {
            None => None,
            Some(ssh) => {
                let key = n
                    .nvmet_ssh_key_file
                    .clone()
                    .ok_or("--nvmet-ssh-address needs --nvmet-ssh-key-file")?;
                if n.nvmet_ssh_host_key.is_empty() {
                    return Err("--nvmet-ssh-address needs --nvmet-ssh-host-key (the storage host's SSH host key, checked on that host)".into());
                }
                Some(SshSettings {
                    address: ssh.clone(),
                    user: n.nvmet_ssh_user.clone(),
                    login: SshLogin::KeyFile(key),
                    host_key: HostKeyPolicy::Pinned(host_keys(
                        "--nvmet-ssh-host-key",
                        &n.nvmet_ssh_host_key,
                    )?),
                    timeout: Duration::from_secs(30),
                })
            }
        };
        Ok(NvmetSettings {
            data_dir: config.data_dir.clone(),
            configfs: n.nvmet_configfs.clone(),
            port: PortConfig {
                id: n.nvmet_port_id,
                address: address.to_string(),
                port: n.nvmet_port,
                family: if address.is_ipv4() { "ipv4" } else { "ipv6" },
            },
            nqn_prefix: n.nvme_nqn_prefix.clone(),
            ssh,
        })
    }
}

impl TryFrom<&Config> for RdsOpenSettings {
    type Error = String;

    fn try_from(config: &Config) -> Result<Self, String> {
        let r = &config.rds;
        let address = r
            .rds_address
            .clone()
            .ok_or("--backend rds needs --rds-address (the router's SSH host:port)")?;
        let login = match (&r.rds_key_file, &r.rds_password_file) {
            (None, None) => {
                return Err("--backend rds needs --rds-key-file or --rds-password-file".into())
            }
            (Some(_), Some(_)) => {
                return Err("--rds-key-file and --rds-password-file exclude each other".into())
            }
            (Some(key), None) => SshLogin::KeyFile(key.clone()),
            (None, Some(file)) => SshLogin::PasswordFile(file.clone()),
        };
        let host_key = if r.rds_insecure_skip_host_key_check {
            HostKeyPolicy::Insecure
        } else if r.rds_host_key.is_empty() {
            return Err("--backend rds needs --rds-host-key (the router's SSH host key, from `/ip ssh export` or ssh-keyscan, checked on its console); --rds-insecure-skip-host-key-check turns verification off for a lab".into());
        } else {
            HostKeyPolicy::Pinned(host_keys("--rds-host-key", &r.rds_host_key)?)
        };
        let dir_ok = r.rds_volume_dir.starts_with('/')
            && r.rds_volume_dir.len() > 1
            && !r.rds_volume_dir.contains("..")
            && r.rds_volume_dir
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
        if !dir_ok {
            return Err(format!("--rds-volume-dir {:?} must be an absolute router path of letters, digits and / - _ .", r.rds_volume_dir));
        }
        // Nodes reach the router's NVMe/TCP at its SSH host unless told otherwise.
        let nvme_address = r.rds_nvme_address.clone().unwrap_or_else(|| {
            address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
                .trim_matches(['[', ']'])
                .to_owned()
        });
        Ok(RdsOpenSettings {
            ssh: SshSettings {
                address,
                user: r.rds_user.clone(),
                login,
                host_key,
                timeout: r.rds_command_timeout,
            },
            rds: RdsSettings {
                volume_dir: r.rds_volume_dir.clone(),
                nvme_address,
                nvme_port: r.rds_nvme_port,
                attempts: r.rds_attempts,
                backoff: Duration::from_millis(500),
            },
        })
    }
}

impl TryFrom<&Config> for BackendSettings {
    type Error = String;

    fn try_from(config: &Config) -> Result<Self, String> {
        Ok(match config.backend {
            BackendKind::File => BackendSettings::File {
                data_dir: config.data_dir.clone(),
            },
            BackendKind::Nvmet => BackendSettings::Nvmet(NvmetSettings::try_from(config)?),
            BackendKind::Rds => BackendSettings::Rds(RdsOpenSettings::try_from(config)?),
        })
    }
}
