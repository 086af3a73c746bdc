//! The kernel's own NBD client: `handoff-csi nbd-client --kernel-backend …` negotiates
//! the export in user space (NBD_OPT_GO, the secret never leaves this process), hands
//! the socket to nbd.ko over netlink and stays as the device's supervisor: it hears
//! LINK_DEAD and gives the device a fresh connection, refreshes the size on request, and
//! disconnects the device for good when the target refuses it (fenced).
//!
//! The device outlives its supervisor (the kernel holds the socket): a restarted node
//! plugin finds it by its backend identifier in sysfs and starts a supervisor that
//! adopts it.
//!
//! Timing: the kernel marks a connection dead when a request goes unanswered for half of
//! `--nbd-io-timeout`, and fails queued I/O when no new connection came within the other
//! half, so a request fails after about the I/O timeout (plus the kernel's timer slack).

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::client::{ClientError, NbdClient};
use super::fuse_disk::{within, Remote, MAX_BACKOFF};
use super::netlink::{DeviceConfig, NbdNetlink};
use crate::nbd::proto::TFLAG_READ_ONLY;

/// Where the kernel lists block devices.
pub const SYS_BLOCK: &str = "/sys/block";
/// The logical block size of our NBD devices: what a loop device gives, so a volume
/// looks the same to a guest on either kind of node.
const BLOCK_SIZE: u64 = 512;
/// How often the supervisor checks that its device still exists.
const POLL: Duration = Duration::from_millis(250);

/// `/dev/nbd<index>`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The index of `/dev/nbd<index>`, for paths of that form only.
pub fn index_of(path: &Path) -> Option<u32> {
    let name = path.strip_prefix("/dev").ok()?.to_str()?;
    let digits = name.strip_prefix("nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The kernel's nbd devices as sysfs shows them.
#[derive(Debug, Clone)]
pub struct SysBlock {
    root: PathBuf,
}

impl Default for SysBlock {
    fn default() -> Self {
        SysBlock {
            root: PathBuf::from(SYS_BLOCK),
        }
    }
}

impl SysBlock {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        SysBlock { root: root.into() }
    }

    /// Every configured nbd device whose backend identifier starts with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> io::Result<Vec<(u32, String)>> {
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(index) = name
                .to_str()
                .and_then(|n| index_of(&Path::new("/dev").join(n)))
            else {
                continue;
            };
            // Present only while the device is configured (connected or held open).
            match std::fs::read_to_string(entry.path().join("backend")) {
                Ok(b) => {
                    let b = b.trim_end_matches('\n');
                    if b.starts_with(prefix) {
                        found.push((index, b.to_owned()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        found.sort();
        Ok(found)
    }

    /// The device carrying exactly `backend`.
    pub fn find(&self, backend: &str) -> io::Result<Option<u32>> {
        Ok(self
            .with_prefix(backend)?
            .into_iter()
            .find(|(_, b)| b == backend)
            .map(|(i, _)| i))
    }

    /// The device's size in bytes.
    pub fn size(&self, index: u32) -> io::Result<u64> {
        let text = std::fs::read_to_string(self.root.join(format!("nbd{index}/size")))?;
        let sectors: u64 = text
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("size: {e}")))?;
        Ok(sectors * 512)
    }
}

/// Whether nbd.ko answers on netlink here (loading the module first when it can).
pub fn available() -> io::Result<()> {
    if !Path::new("/sys/module/nbd").exists() {
        // Best effort: a container without modprobe or module files simply finds none.
        let _ = std::process::Command::new("modprobe")
            .arg("nbd")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    NbdNetlink::open().map(drop)
}

/// The supervisor's files next to the volume's directory in the node's NBD run dir.
#[derive(Debug, Clone)]
pub struct SupervisorFiles {
    base: PathBuf,
}

/// What a supervisor publishes about itself (written whole, by rename).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SupervisorState {
    pub pid: u32,
    pub index: Option<u32>,
    /// Bumped after each size refresh, with the size the target reported.
    pub resized: u64,
    pub size: u64,
}

impl SupervisorFiles {
    /// `base` is `<run dir>/<volume id>`.
    pub fn new(base: &Path) -> Self {
        SupervisorFiles {
            base: base.to_path_buf(),
        }
    }

    fn lock_path(&self) -> PathBuf {
        self.base.with_extension("lock")
    }

    fn state_path(&self) -> PathBuf {
        self.base.with_extension("state")
    }

    /// Takes the volume's supervisor lock; None when a live supervisor holds it.
    fn lock(&self) -> io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_path())?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(e.into()),
        }
    }

    /// Whether a live supervisor holds the lock (it dies with its process).
    pub fn supervised(&self) -> io::Result<bool> {
        match std::fs::metadata(self.lock_path()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        Ok(self.lock()?.is_none())
    }

    pub fn state(&self) -> io::Result<Option<SupervisorState>> {
        match std::fs::read(self.state_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn publish(&self, state: &SupervisorState) -> io::Result<()> {
        let tmp = self.base.with_extension("state.tmp");
        std::fs::write(&tmp, serde_json::to_vec(state).expect("state serialises"))?;
        std::fs::rename(tmp, self.state_path())
    }

    /// Asks the live supervisor to re-read the export's size and waits until the device
    /// has it; returns the new size.
    pub fn refresh_size(&self, timeout: Duration) -> Result<u64, String> {
        if !self.supervised().map_err(|e| e.to_string())? {
            return Err(
                "no nbd-client supervises this device (restage the volume to start one)".into(),
            );
        }
        let before = self
            .state()
            .map_err(|e| e.to_string())?
            .ok_or("the nbd-client has not published its state yet")?;
        let pid = nix::unistd::Pid::from_raw(before.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1)
            .map_err(|e| format!("signal nbd-client {pid}: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(now) = self.state().map_err(|e| e.to_string())? {
                if now.resized > before.resized {
                    return Ok(now.size);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the nbd-client did not refresh the size within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the supervisor's files once its device is gone.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(self.state_path());
        let _ = std::fs::remove_file(self.lock_path());
    }
}

/// What one supervisor serves.
pub struct Supervise {
    pub remote: Remote,
    pub backend: String,
    pub read_only: bool,
    pub files: SupervisorFiles,
    pub sys: SysBlock,
}

static RESIZE_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    RESIZE_ASKED.store(true, Ordering::SeqCst);
}

/// Why a connection attempt did not give a socket.
enum Dial {
    /// The target refused this attachment (fenced, or it ended): final.
    Refused(String),
    /// Unreachable, timed out or "ask again": worth another try.
    Failed(String),
}

impl Supervise {
    fn dial(&self, rt: &tokio::runtime::Runtime) -> Result<(std::net::TcpStream, u64, u16), Dial> {
        // One attempt is bounded on its own, so a stalled target cannot hold the loop.
        let limit =
            (self.remote.io_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(5));
        let attempt = within(rt, limit, async {
            let client = NbdClient::connect(&self.remote.address, &self.remote.export).await?;
            let (size, flags) = (client.size(), client.flags());
            Ok::<_, ClientError>((client.into_std()?, size, flags))
        });
        match attempt {
            None => Err(Dial::Failed(format!("no answer within {limit:?}"))),
            Some(Ok(ok)) => Ok(ok),
            Some(Err(e)) if e.retry_later() => Err(Dial::Failed(e.to_string())),
            Some(Err(e @ ClientError::Refused { .. })) => Err(Dial::Refused(e.to_string())),
            Some(Err(e)) => Err(Dial::Failed(e.to_string())),
        }
    }

    fn config(&self, size: u64, flags: u16) -> DeviceConfig {
        let half = self.remote.io_timeout / 2;
        DeviceConfig {
            size,
            block_size: BLOCK_SIZE,
            server_flags: if self.read_only {
                flags | TFLAG_READ_ONLY
            } else {
                flags
            },
            request_timeout: half,
            dead_conn_timeout: half,
            backend: self.backend.clone(),
        }
    }

    /// Connects (or adopts) the device, then supervises it until it is disconnected.
    pub fn run(self) -> Result<(), String> {
        let Some(_lock) = self.files.lock().map_err(|e| format!("lock: {e}"))? else {
            return Err("another nbd-client already supervises this volume".into());
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut nl = NbdNetlink::open().map_err(|e| format!("nbd netlink: {e}"))?;
        // Events on a socket of their own, so a request's reply loop never eats one.
        let mut events = NbdNetlink::open().map_err(|e| format!("nbd netlink: {e}"))?;
        events
            .subscribe()
            .map_err(|e| format!("nbd netlink events: {e}"))?;
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            nix::sys::signal::sigaction(
                nix::sys::signal::Signal::SIGUSR1,
                &nix::sys::signal::SigAction::new(
                    nix::sys::signal::SigHandler::Handler(on_sigusr1),
                    nix::sys::signal::SaFlags::empty(),
                    nix::sys::signal::SigSet::empty(),
                ),
            )
        }
        .map_err(|e| format!("sigaction: {e}"))?;
        let mut state = SupervisorState {
            pid: std::process::id(),
            ..Default::default()
        };
        let adopted = self.sys.find(&self.backend).map_err(|e| e.to_string())?;
        let index = match adopted {
            Some(index) => {
                tracing::info!(device = %device_path(index).display(), "adopting the NBD device");
                state.size = self.sys.size(index).unwrap_or(0);
                index
            }
            None => {
                let deadline = Instant::now() + self.remote.io_timeout;
                let mut backoff = Duration::from_millis(50);
                let (stream, size, flags) = loop {
                    match self.dial(&rt) {
                        Ok(ok) => break ok,
                        Err(Dial::Refused(why)) => return Err(why),
                        Err(Dial::Failed(why)) if Instant::now() > deadline => return Err(why),
                        Err(Dial::Failed(_)) => {
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                };
                let index = nl
                    .connect(&self.config(size, flags), stream.as_raw_fd())
                    .map_err(|e| format!("NBD_CMD_CONNECT: {e}"))?;
                // The kernel holds its own reference to the socket.
                drop(stream);
                state.size = size;
                tracing::info!(device = %device_path(index).display(), size, "NBD export connected through the kernel's nbd driver");
                index
            }
        };
        state.index = Some(index);
        self.files
            .publish(&state)
            .map_err(|e| format!("publish state: {e}"))?;
        // An adopted device may have lost its link while nobody supervised it: offer a
        // connection now (the kernel ignores it when no connection is dead).
        let mut link_dead = adopted.is_some();
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.sys.find(&self.backend).map_err(|e| e.to_string())? != Some(index) {
                tracing::info!(device = %device_path(index).display(), "NBD device disconnected; supervisor exits");
                self.files.remove();
                return Ok(());
            }
            if RESIZE_ASKED.swap(false, Ordering::SeqCst) {
                match within(
                    &rt,
                    self.remote.io_timeout,
                    NbdClient::export_size(&self.remote.address, &self.remote.export),
                ) {
                    Some(Ok(size)) => {
                        match nl.reconfigure(index, &self.backend, None, Some(size)) {
                            Ok(()) => {
                                state.size = size;
                                state.resized += 1;
                                let _ = self.files.publish(&state);
                                tracing::info!(size, "NBD device size refreshed");
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "NBD size refresh refused by the kernel")
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "NBD size refresh: the target did not answer")
                    }
                    None => tracing::warn!("NBD size refresh timed out"),
                }
            }
            if link_dead {
                match self.dial(&rt) {
                    Ok((stream, _, _)) => {
                        match nl.reconfigure(index, &self.backend, Some(stream.as_raw_fd()), None) {
                            Ok(()) => {
                                tracing::info!(device = %device_path(index).display(), "NBD connection re-established");
                                link_dead = false;
                                backoff = Duration::from_millis(50);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "NBD_CMD_RECONFIGURE failed; retrying")
                            }
                        }
                    }
                    Err(Dial::Refused(why)) => {
                        // Fenced: fail every request now and never reconnect.
                        tracing::warn!(reason = %why, device = %device_path(index).display(), "the NBD target refused this node; disconnecting the device");
                        nl.disconnect(index)
                            .map_err(|e| format!("NBD_CMD_DISCONNECT: {e}"))?;
                        self.files.remove();
                        return Ok(());
                    }
                    Err(Dial::Failed(why)) => {
                        tracing::warn!(reason = %why, "NBD target unreachable; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            }
            match events.next_link_dead(POLL) {
                Ok(dead) => link_dead = dead.contains(&index),
                // ENOBUFS: events were lost; one might have been ours.
                Err(e) => {
                    tracing::warn!(error = %e, "NBD netlink events lost; checking the link");
                    link_dead = true;
                }
            }
        }
    }
}

/// A backend identifier is ours to write into sysfs: short printable ASCII.
pub fn check_backend(backend: &str) -> Result<(), String> {
    if backend.is_empty() || backend.len() > 256 || !backend.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{backend:?} is not a backend identifier (1-256 printable ASCII characters, no spaces)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_identifiers_are_checked() {
        assert!(check_backend("handoff-csi:node-a/vol-1").is_ok());
        for bad in ["", "a b", "a\nb", &"x".repeat(257)] {
            assert!(check_backend(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_nbd_device_paths_have_an_index() {
        assert_eq!(index_of(Path::new("/dev/nbd0")), Some(0));
        assert_eq!(index_of(Path::new("/dev/nbd15")), Some(15));
        for bad in [
            "/dev/nbd",
            "/dev/nbd1p1",
            "/dev/loop0",
            "/tmp/nbd1",
            "/dev/nbd-1",
        ] {
            assert_eq!(index_of(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn devices_are_found_by_their_backend_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let sys = SysBlock::at(dir.path());
        for (name, backend) in [
            ("nbd0", Some("handoff-csi:node-a/vol-1\n")),
            ("nbd1", Some("handoff-csi:node-b/vol-1\n")),
            ("nbd2", None),
            ("nbd3", Some("someone-else\n")),
            ("loop0", Some("handoff-csi:node-a/vol-2\n")),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            if let Some(b) = backend {
                std::fs::write(dir.path().join(name).join("backend"), b).unwrap();
            }
        }
        std::fs::write(dir.path().join("nbd0/size"), "2048\n").unwrap();
        assert_eq!(sys.find("handoff-csi:node-a/vol-1").unwrap(), Some(0));
        assert_eq!(sys.find("handoff-csi:node-a/vol").unwrap(), None);
        assert_eq!(
            sys.with_prefix("handoff-csi:node-a/").unwrap(),
            vec![(0, "handoff-csi:node-a/vol-1".to_owned())]
        );
        assert_eq!(sys.size(0).unwrap(), 2048 * 512);
        assert!(SysBlock::at(dir.path().join("absent"))
            .with_prefix("")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_held_lock_means_a_live_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let files = SupervisorFiles::new(&dir.path().join("vol-x"));
        assert!(!files.supervised().unwrap());
        let held = files.lock().unwrap().expect("free");
        assert!(files.supervised().unwrap());
        assert!(files.lock().unwrap().is_none());
        drop(held);
        assert!(!files.supervised().unwrap());
        let state = SupervisorState {
            pid: 42,
            index: Some(3),
            resized: 1,
            size: 4096,
        };
        files.publish(&state).unwrap();
        assert_eq!(files.state().unwrap(), Some(state));
        files.remove();
        assert_eq!(files.state().unwrap(), None);
    }
}
