//! The `nbd` transport: a per-volume `handoff-csi nbd-client` process presents the export
//! as `<run dir>/<volume>/disk` through FUSE, and a loop device with direct I/O turns
//! that file into the block device. The client is a process of its own (its own process
//! group), so a crash or restart of the node plugin leaves I/O running; the restarted
//! plugin finds its devices through sysfs like the `loop` transport does.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::loopdev::{ImageNames, LoopPaths, LoopTransport};
use super::{Device, Transport, TransportError};
use crate::export::ExportInfo;
use crate::ids::VolumeId;
use crate::nbd::fuse_disk::DISK_NAME;
use crate::node::mountinfo::find_mount;

/// FUSE filesystem type of our disks in mountinfo.
const FS_TYPE: &str = "fuse.handoff-nbd";
/// How long a starting client may take to mount its disk.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// `<run dir>/<volume id>/disk`: the only backing files this transport attaches.
#[derive(Debug)]
pub struct NbdDisks {
    run_dir: PathBuf,
}

impl NbdDisks {
    fn mountpoint(&self, volume: &VolumeId) -> PathBuf {
        self.run_dir.join(volume.as_str())
    }

    fn disk(&self, volume: &VolumeId) -> PathBuf {
        self.mountpoint(volume).join(DISK_NAME)
    }
}

impl ImageNames for NbdDisks {
    fn volume_of(&self, path: &Path) -> Option<VolumeId> {
        let dir = path.parent()?;
        let id = VolumeId::parse(dir.file_name()?.to_str()?).ok()?;
        (self.disk(&id) == path).then_some(id)
    }
    fn home(&self) -> &Path {
        &self.run_dir
    }
}

/// Who starts the per-volume clients.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// This plugin, as processes of their own group: they outlive the plugin process,
    /// not its container.
    Direct,
    /// A long-lived `handoff-csi nbd-keeper` (its own DaemonSet) listening on this
    /// socket: the clients outlive the plugin's container too.
    Keeper(PathBuf),
}

/// What it takes to start one client.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientLaunch {
    pub address: String,
    /// Carries the attachment's secret: never logged.
    pub export: String,
    pub mountpoint: PathBuf,
    pub io_timeout_ms: u64,
}

/// Starts `binary nbd-client` for `launch` in its own process group and waits until its
/// disk appears; a client that exits first reports the tail of its log.
pub fn launch_client(binary: &Path, launch: &ClientLaunch) -> Result<(), String> {
    let mnt = &launch.mountpoint;
    std::fs::create_dir_all(mnt).map_err(|e| format!("create {}: {e}", mnt.display()))?;
    let log_path = mnt.with_extension("log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let mut child = Command::new(binary)
        .arg("nbd-client")
        .arg("--address")
        .arg(&launch.address)
        .arg("--mountpoint")
        .arg(mnt)
        .arg("--io-timeout")
        .arg(format!("{}ms", launch.io_timeout_ms))
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
    let disk = mnt.join(DISK_NAME);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if std::fs::metadata(&disk).is_ok() {
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

#[derive(Debug, Clone)]
pub struct NbdTransport {
    loops: LoopTransport,
    disks: Arc<NbdDisks>,
    /// The handoff-csi executable that runs `nbd-client`.
    binary: PathBuf,
    io_timeout: Duration,
    launcher: Launcher,
}

fn sys_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TransportError + 'a {
    move |source| TransportError::Sys {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl NbdTransport {
    /// `run_dir` is created if missing; it must be on a local filesystem of this node.
    pub fn new(
        run_dir: &Path,
        paths: LoopPaths,
        owner: &str,
        binary: PathBuf,
        io_timeout: Duration,
        launcher: Launcher,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(run_dir)?;
        // sysfs reports the resolved backing path.
        let run_dir = std::fs::canonicalize(run_dir)?;
        let disks = Arc::new(NbdDisks { run_dir });
        Ok(NbdTransport {
            loops: LoopTransport::for_images(disks.clone(), paths, owner),
            disks,
            binary,
            io_timeout,
            launcher,
        })
    }

    /// Whether a live client serves `volume`'s disk (mounted, and answering a stat).
    fn client_alive(&self, volume: &VolumeId) -> Result<bool, TransportError> {
        let mnt = self.disks.mountpoint(volume);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(sys_err("read", Path::new("/proc/self/mountinfo")))?;
        let Some(m) = find_mount(&mountinfo, &mnt) else {
            return Ok(false);
        };
        if m.fs_type == FS_TYPE && std::fs::metadata(self.disks.disk(volume)).is_ok() {
            return Ok(true);
        }
        // A dead client leaves "transport endpoint is not connected" behind: clear it.
        unmount(&mnt)?;
        Ok(false)
    }

    fn start_client(
        &self,
        volume: &VolumeId,
        address: &str,
        export: &str,
    ) -> Result<(), TransportError> {
        let launch = ClientLaunch {
            address: address.to_owned(),
            export: export.to_owned(),
            mountpoint: self.disks.mountpoint(volume),
            io_timeout_ms: self.io_timeout.as_millis() as u64,
        };
        let result = match &self.launcher {
            Launcher::Direct => launch_client(&self.binary, &launch),
            Launcher::Keeper(socket) => crate::nbd::keeper::request(socket, &launch),
        };
        result.map_err(|reason| TransportError::NbdClient {
            volume: volume.clone(),
            reason,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&NbdTransport) -> Result<T, TransportError> + Send + 'static,
    ) -> Result<T, TransportError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .expect("nbd transport task panicked")
    }
}

/// Lazily unmounts `mnt` (the client exits when its session ends); absent is fine.
fn unmount(mnt: &Path) -> Result<(), TransportError> {
    match nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(sys_err("unmount", mnt)(std::io::Error::from(e))),
    }
}

#[async_trait]
impl Transport for NbdTransport {
    async fn connect(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
        read_only: bool,
    ) -> Result<Device, TransportError> {
        let ExportInfo::Nbd { address, export } = export else {
            return Err(TransportError::Unsupported(export.transport_name()));
        };
        let (volume, address, export) = (volume.clone(), address.clone(), export.clone());
        self.blocking(move |t| {
            if let Some(existing) = t.loops.scan()?.into_iter().find(|d| d.volume_id == volume) {
                return Ok(existing);
            }
            if !t.client_alive(&volume)? {
                t.start_client(&volume, &address, &export)?;
            }
            let path = t.loops.attach(&t.disks.disk(&volume), read_only)?;
            Ok(Device {
                volume_id: volume,
                path,
                backing_deleted: false,
            })
        })
        .await
    }

    async fn find_device(&self, volume: &VolumeId) -> Result<Option<Device>, TransportError> {
        self.loops.find_device(volume).await
    }

    async fn disconnect(&self, device: &Device) -> Result<(), TransportError> {
        let device = device.clone();
        self.blocking(move |t| {
            t.loops.detach(&device.path)?;
            let mnt = t.disks.mountpoint(&device.volume_id);
            unmount(&mnt)?;
            let _ = std::fs::remove_dir(&mnt);
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Device>, TransportError> {
        self.loops.list().await
    }

    async fn refresh_capacity(&self, device: &Device) -> Result<(), TransportError> {
        // A stat makes the client ask the target for the size, so the kernel's view of
        // the file grows before the loop device re-reads it.
        let disk = self.disks.disk(&device.volume_id);
        tokio::fs::metadata(&disk)
            .await
            .map_err(sys_err("stat", &disk))?;
        self.loops.refresh_capacity(device).await
    }

    async fn probe(&self) -> Result<(), TransportError> {
        let fuse = Path::new("/dev/fuse");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(fuse)
            .map(drop)
            .map_err(sys_err("open", fuse))?;
        self.loops.probe().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_disks_under_the_run_dir_are_ours() {
        let disks = NbdDisks {
            run_dir: PathBuf::from("/run/handoff-csi/nbd"),
        };
        let v = VolumeId::generate();
        assert_eq!(disks.volume_of(&disks.disk(&v)), Some(v.clone()));
        for other in [
            PathBuf::from(format!("/run/handoff-csi/nbd/{v}/other")),
            PathBuf::from(format!("/elsewhere/{v}/disk")),
            PathBuf::from("/run/handoff-csi/nbd/vol-nope/disk"),
            PathBuf::from(format!("/run/handoff-csi/nbd/{v}/../{v}/disk")),
        ] {
            assert_eq!(disks.volume_of(&other), None, "{}", other.display());
        }
    }
}
