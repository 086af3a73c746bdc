//! The configured backend, built in one place: the typed settings each backend needs
//! (checked once, from the flags, by `config`) and `open`, one arm per backend. A new
//! backend is its own module plus one `BackendSettings` variant and one arm here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::file::FileBackend;
use super::nvmet::{KernelConfigFs, Nvmet, PortConfig, RemoteConfigFs};
use super::nvmet_file::NvmetBackend;
use super::rds::{RdsBackend, RdsSettings};
use super::ssh::{Credentials, HostKeyPolicy, SshShell, SshTarget};
use super::{Backend, BackendError};

/// How to log in over SSH (nvmet on a remote storage host, RouterOS).
#[derive(Debug, Clone)]
pub enum SshLogin {
    KeyFile(PathBuf),
    /// Read when the backend is opened; the password never sits in the settings.
    PasswordFile(PathBuf),
}

/// An SSH target with its checked host keys.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// host:port
    pub address: String,
    pub user: String,
    pub login: SshLogin,
    pub host_key: HostKeyPolicy,
    /// Bound on connecting and on each command.
    pub timeout: Duration,
}

impl SshSettings {
    fn shell(self) -> Result<SshShell, BackendError> {
        let credentials = match self.login {
            SshLogin::KeyFile(path) => Credentials::KeyFile(path),
            SshLogin::PasswordFile(path) => Credentials::Password(
                std::fs::read_to_string(&path)
                    .map_err(|e| BackendError::Unhealthy {
                        path: path.clone(),
                        reason: format!("the SSH password file cannot be read: {e}"),
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
        };
        Ok(SshShell::new(SshTarget {
            address: self.address,
            user: self.user,
            credentials,
            host_key: self.host_key,
            timeout: self.timeout,
        }))
    }
}

/// `--backend nvmet`: the images in `data_dir`, exported by the Linux NVMe target whose
/// configfs is local or (with `ssh`) on the storage host.
#[derive(Debug, Clone)]
pub struct NvmetSettings {
    pub data_dir: PathBuf,
    pub configfs: PathBuf,
    pub port: PortConfig,
    pub nqn_prefix: String,
    pub ssh: Option<SshSettings>,
}

/// `--backend rds`: a MikroTik RouterOS storage server.
#[derive(Debug, Clone)]
pub struct RdsOpenSettings {
    pub ssh: SshSettings,
    pub rds: RdsSettings,
}

#[derive(Debug, Clone)]
pub enum BackendSettings {
    /// Sparse images in the data dir.
    File {
        data_dir: PathBuf,
    },
    Nvmet(NvmetSettings),
    Rds(RdsOpenSettings),
}

/// Opens the backend the settings name.
pub fn open(settings: BackendSettings) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(match settings {
        BackendSettings::File { data_dir } => Arc::new(FileBackend::open(&data_dir)?),
        BackendSettings::Nvmet(n) => {
            let files: Arc<dyn Backend> = Arc::new(FileBackend::open(&n.data_dir)?);
            match n.ssh {
                None => Arc::new(NvmetBackend::new(
                    files,
                    Nvmet::new(KernelConfigFs, n.configfs, n.port, &n.nqn_prefix),
                )),
                Some(ssh) => {
                    let fs = RemoteConfigFs::new(Arc::new(ssh.shell()?));
                    Arc::new(NvmetBackend::new(
                        files,
                        Nvmet::new(fs, n.configfs, n.port, &n.nqn_prefix),
                    ))
                }
            }
        }
        BackendSettings::Rds(r) => Arc::new(RdsBackend::new(Arc::new(r.ssh.shell()?), r.rds)),
    })
}
