//! Commands on a storage host over SSH (russh): one connection, reused, one command at
//! a time (RouterOS limits concurrent sessions), the server's host key pinned.
//! Skipping host-key verification takes an explicit flag and is logged loudly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use russh::client;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

/// Runs one command and returns what it printed (stdout and stderr together, as a
/// RouterOS console shows them).
#[async_trait]
pub trait CommandShell: Send + Sync + 'static {
    async fn run(&self, command: &str) -> Result<String, ShellError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    #[error("cannot reach {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("host key of {address} is {seen}, which matches none of the pinned keys: refusing to connect (if the storage host was reinstalled, pin its new key after checking it on its console)")]
    HostKey { address: String, seen: String },
    #[error("{address} refused the login of {user:?}: check the user, key or password")]
    Auth { address: String, user: String },
    #[error("cannot use the private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the command did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the SSH session broke: {0}")]
    Session(String),
}

impl ShellError {
    /// Worth another attempt on a fresh connection: never a key or login refusal.
    pub fn transient(&self) -> bool {
        !matches!(
            self,
            ShellError::HostKey { .. } | ShellError::Auth { .. } | ShellError::Key { .. }
        )
    }
}

/// A pinned host key: the OpenSSH public key line, or its `SHA256:` fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPin {
    Key(PublicKey),
    Fingerprint(String),
}

impl std::str::FromStr for HostKeyPin {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.starts_with("SHA256:") {
            return Ok(HostKeyPin::Fingerprint(s.to_owned()));
        }
        PublicKey::from_openssh(s)
            .map(HostKeyPin::Key)
            .map_err(|e| format!("not an OpenSSH public key (\"ssh-ed25519 AAAA…\") nor a SHA256: fingerprint: {e}"))
    }
}

impl HostKeyPin {
    fn matches(&self, key: &PublicKey) -> bool {
        match self {
            HostKeyPin::Key(pinned) => pinned.key_data() == key.key_data(),
            HostKeyPin::Fingerprint(f) => key.fingerprint(HashAlg::Sha256).to_string() == *f,
        }
    }
}

#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    Pinned(Vec<HostKeyPin>),
    /// `--rds-insecure-skip-host-key-check`: anyone on the path can pose as the host.
    Insecure,
}

#[derive(Clone)]
pub enum Credentials {
    /// An OpenSSH private key file.
    KeyFile(PathBuf),
    Password(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::KeyFile(p) => f.debug_tuple("KeyFile").field(p).finish(),
            Credentials::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SshTarget {
    /// host:port
    pub address: String,
    pub user: String,
    pub credentials: Credentials,
    pub host_key: HostKeyPolicy,
    /// Bound on connecting and on each command.
    pub timeout: Duration,
}

struct Verifier {
    policy: HostKeyPolicy,
    /// The key the server showed, for the error message.
    seen: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            // Host certificates are not part of the pinning model.
            PublicKeyOrCertificate::Certificate(_) => return Ok(false),
        };
        *self.seen.lock() = Some(key.fingerprint(HashAlg::Sha256).to_string());
        Ok(match &self.policy {
            HostKeyPolicy::Insecure => true,
            HostKeyPolicy::Pinned(pins) => pins.iter().any(|p| p.matches(key)),
        })
    }
}

/// The SSH shell: one connection, opened on first use and again after it breaks;
/// the mutex makes commands strictly one at a time.
pub struct SshShell {
    target: SshTarget,
    conn: tokio::sync::Mutex<Option<client::Handle<Verifier>>>,
}

impl SshShell {
    pub fn new(target: SshTarget) -> Self {
        if matches!(target.host_key, HostKeyPolicy::Insecure) {
            tracing::warn!(address = %target.address, "SSH host key verification is OFF: anyone on the network path can pose as the storage host and receive its credentials");
        }
        SshShell {
            target,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn connect(&self) -> Result<client::Handle<Verifier>, ShellError> {
        let t = &self.target;
        let seen = Arc::new(Mutex::new(None));
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(300)),
            // Commands are small request/response exchanges: without TCP_NODELAY each
            // one waits out Nagle against delayed ACKs (~40 ms).
            nodelay: true,
            ..Default::default()
        });
        let handler = Verifier {
            policy: t.host_key.clone(),
            seen: seen.clone(),
        };
        let connect = tokio::time::timeout(
            t.timeout,
            client::connect(config, t.address.as_str(), handler),
        );
        let mut handle = match connect.await {
            Err(_) => {
                return Err(ShellError::Connect {
                    address: t.address.clone(),
                    reason: format!("no answer within {:?}", t.timeout),
                })
            }
            Ok(Err(russh::Error::UnknownKey)) => {
                return Err(ShellError::HostKey {
                    address: t.address.clone(),
                    seen: seen
                        .lock()
                        .clone()
                        .unwrap_or_else(|| "a certificate".into()),
                })
            }
            Ok(Err(e)) => {
                return Err(ShellError::Connect {
                    address: t.address.clone(),
                    reason: e.to_string(),
                })
            }
            Ok(Ok(handle)) => handle,
        };
        let session = |e: russh::Error| ShellError::Session(e.to_string());
        let result = match &t.credentials {
            Credentials::Password(p) => handle
                .authenticate_password(t.user.clone(), p.clone())
                .await
                .map_err(session)?,
            Credentials::KeyFile(path) => {
                let key =
                    russh::keys::load_secret_key(path, None).map_err(|e| ShellError::Key {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                let hash = handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(session)?
                    .flatten();
                handle
                    .authenticate_publickey(
                        t.user.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                    )
                    .await
                    .map_err(session)?
            }
        };
        if !result.success() {
            return Err(ShellError::Auth {
                address: t.address.clone(),
                user: t.user.clone(),
            });
        }
        tracing::info!(address = %t.address, user = %t.user, "SSH session to the storage host open");
        Ok(handle)
    }

    async fn exec(handle: &client::Handle<Verifier>, command: &str) -> Result<String, ShellError> {
        let session = |e: russh::Error| ShellError::Session(e.to_string());
        let mut channel = handle.channel_open_session().await.map_err(session)?;
        channel.exec(true, command).await.map_err(session)?;
        let mut out = Vec::new();
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
                russh::ChannelMsg::ExtendedData { data, .. } => out.extend_from_slice(&data),
                russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
        match status {
            Some(0) => Ok(text),
            // A failure, whatever it printed (and if it printed nothing, still a failure).
            Some(code) => Ok(format!(
                "failure: the command exited with status {code}: {}",
                text.trim()
            )),
            // The channel closed before the command said how it ended: what it printed
            // may be partial, and "no error seen" is not "done".
            None => Err(ShellError::Session(
                "the channel closed without an exit status; the command may not have finished"
                    .into(),
            )),
        }
    }
}

#[async_trait]
impl CommandShell for SshShell {
    async fn run(&self, command: &str) -> Result<String, ShellError> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|h| h.is_closed()) {
            // Bounded as a whole: a server that stalls the login is no better than one
            // that never answers.
            let connected = tokio::time::timeout(self.target.timeout, self.connect())
                .await
                .map_err(|_| ShellError::Connect {
                    address: self.target.address.clone(),
                    reason: format!("no login within {:?}", self.target.timeout),
                })??;
            *conn = Some(connected);
        }
        let handle = conn.as_ref().expect("connected above");
        let result =
            match tokio::time::timeout(self.target.timeout, Self::exec(handle, command)).await {
                Ok(r) => r,
                Err(_) => Err(ShellError::Timeout(self.target.timeout)),
            };
        if result.is_err() {
            // A broken or stuck session is not reused.
            *conn = None;
        }
        result
    }
}
