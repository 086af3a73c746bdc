//! How a node starts the per-volume `handoff-csi nbd-client`: the launch request (also
//! what the nbd-keeper receives over its socket), starting the process in its own group
//! and waiting until it serves the volume. Shared by the node's transport and the keeper.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::fuse_disk::DISK_NAME;
use super::kernel::{SupervisorFiles, SysBlock};

/// How long a starting client may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Which NBD client a node uses for new attachments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// The kernel's nbd driver where nbd.ko answers, FUSE otherwise.
    Auto,
    Kernel,
    Fuse,
}

/// What it takes to start one client.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientLaunch {
    pub address: String,
    /// Carries the attachment's secret: never logged.
    pub export: String,
    pub mountpoint: PathBuf,
    pub io_timeout_ms: u64,
    /// Drive the kernel's nbd device instead of FUSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelLaunch>,
}

/// A client for the kernel's nbd driver: the device's backend identifier.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KernelLaunch {
    pub backend: String,
    pub read_only: bool,
}

impl ClientLaunch {
    /// Whether the client `pid` has come up: its FUSE disk is there, or it published
    /// the kernel device it connected or adopted.
    fn ready(&self, pid: u32) -> bool {
        match &self.kernel {
            None => std::fs::metadata(self.mountpoint.join(DISK_NAME)).is_ok(),
            Some(k) => {
                let state = SupervisorFiles::new(&self.mountpoint)
                    .state()
                    .ok()
                    .flatten();
                state.is_some_and(|s| {
                    s.pid == pid && s.index == SysBlock::default().find(&k.backend).ok().flatten()
                })
            }
        }
    }
}

/// Starts `binary nbd-client` for `launch` in its own process group and waits until its
/// disk appears; a client that exits first reports the tail of its log.
pub fn launch_client(binary: &Path, launch: &ClientLaunch) -> Result<(), String> {
    let mnt = &launch.mountpoint;
    if launch.kernel.is_none() {
        std::fs::create_dir_all(mnt).map_err(|e| format!("create {}: {e}", mnt.display()))?;
    }
    let log_path = mnt.with_extension("log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let mut command = Command::new(binary);
    command
        .arg("nbd-client")
        .arg("--address")
        .arg(&launch.address)
        .arg("--mountpoint")
        .arg(mnt)
        .arg("--io-timeout")
        .arg(format!("{}ms", launch.io_timeout_ms));
    if let Some(k) = &launch.kernel {
        command.arg("--kernel-backend").arg(&k.backend);
        if k.read_only {
            command.arg("--read-only");
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a signal to the launcher's group leaves it running.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
    // The export name carries the attachment's secret: stdin, never argv.
    let sent = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(format!("{}\n", launch.export).as_bytes()));
    if let Some(Err(e)) = sent {
        let _ = child.kill();
        return Err(format!("write to nbd-client: {e}"));
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if launch.ready(child.id()) {
            // Reaped by a thread of ours, or by init once the launcher is gone.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: String = tail.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            return Err(format!("exited with {status}: {tail}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no disk after {START_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The keeper's answer to one launch request.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Reply {
    #[serde(default)]
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Largest request line the keeper accepts.
pub(crate) const MAX_REQUEST: u64 = 64 * 1024;

/// Asks the keeper at `socket` to start a client; blocks until it answers.
pub fn request_keeper(socket: &Path, launch: &ClientLaunch) -> Result<(), String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("nbd-keeper at {}: {e}", socket.display()))?;
    let mut line = serde_json::to_vec(launch).expect("launch requests serialise");
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("nbd-keeper: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("nbd-keeper: {e}"))?;
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| format!("nbd-keeper answered {answer:?}: {e}"))?;
    match (reply.ok, reply.error) {
        (true, _) => Ok(()),
        (false, e) => Err(format!(
            "nbd-keeper: {}",
            e.unwrap_or_else(|| "no reason given".into())
        )),
    }
}
