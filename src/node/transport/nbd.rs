//! The `nbd` transport: a per-volume `handoff-csi nbd-client` process connects the
//! export either to the kernel's nbd driver (`/dev/nbd<N>`, see `nbd_kernel`) or, where
//! nbd.ko is absent, presents it as `<run dir>/<volume>/disk` through FUSE with a loop
//! device with direct I/O on that file. The client is a process of its own (its own
//! process group), so a crash or restart of the node plugin leaves I/O running; the
//! restarted plugin finds its devices through sysfs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::loopdev::{ImageNames, LoopPaths, LoopTransport};
use super::nbd_kernel::KernelDevices;
use super::{sys_err, Device, Transport, TransportError};
use crate::export::ExportInfo;
use crate::ids::VolumeId;
use crate::nbd::node::fuse_disk::DISK_NAME;
use crate::nbd::node::kernel::SysBlock;
use crate::nbd::node::launch::{launch_client, ClientKind, ClientLaunch, KernelLaunch};
use crate::node::mountinfo::find_mount;

/// FUSE filesystem type of our disks in mountinfo.
const FS_TYPE: &str = "fuse.handoff-nbd";

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

#[derive(Debug, Clone)]
pub struct NbdTransport {
    loops: LoopTransport,
    disks: Arc<NbdDisks>,
    /// The handoff-csi executable that runs `nbd-client`.
    binary: PathBuf,
    io_timeout: Duration,
    launcher: Launcher,
    /// New attachments go to the kernel's nbd driver; None: through FUSE.
    kernel: Option<KernelDevices>,
    /// Devices of either kind are found, whichever made them (a node may change).
    kernel_devices: KernelDevices,
}

impl NbdTransport {
    /// `run_dir` is created if missing; it must be on a local filesystem of this node.
    /// `client` picks the kernel's nbd driver or FUSE; `auto` takes the kernel's where
    /// nbd.ko answers, and an explicit `kernel` without it is an error.
    pub fn new(
        run_dir: &Path,
        paths: LoopPaths,
        owner: &str,
        binary: PathBuf,
        io_timeout: Duration,
        launcher: Launcher,
        client: ClientKind,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(run_dir)?;
        // sysfs reports the resolved backing path.
        let run_dir = std::fs::canonicalize(run_dir)?;
        let kernel_devices = KernelDevices::new(SysBlock::default(), owner, &run_dir);
        let kernel = match client {
            ClientKind::Fuse => None,
            ClientKind::Kernel => {
                crate::nbd::node::kernel::available().map_err(|e| {
                    std::io::Error::new(e.kind(), format!("--nbd-client kernel: {e}"))
                })?;
                Some(kernel_devices.clone())
            }
            ClientKind::Auto => match crate::nbd::node::kernel::available() {
                Ok(()) => Some(kernel_devices.clone()),
                Err(e) => {
                    tracing::info!(reason = %e, "kernel NBD client unavailable; NBD volumes go through FUSE and a loop device");
                    None
                }
            },
        };
        if kernel.is_some() {
            tracing::info!("NBD volumes use the kernel's nbd driver");
        }
        let disks = Arc::new(NbdDisks { run_dir });
        Ok(NbdTransport {
            loops: LoopTransport::for_images(disks.clone(), paths, owner),
            disks,
            binary,
            io_timeout,
            launcher,
            kernel,
            kernel_devices,
        })
    }

    /// Whether new attachments use the kernel's nbd driver.
    pub fn uses_kernel(&self) -> bool {
        self.kernel.is_some()
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
        kernel: Option<KernelLaunch>,
    ) -> Result<(), TransportError> {
        let launch = ClientLaunch {
            address: address.to_owned(),
            export: export.to_owned(),
            mountpoint: self.disks.mountpoint(volume),
            io_timeout_ms: self.io_timeout.as_millis() as u64,
            kernel,
        };
        let result = match &self.launcher {
            Launcher::Direct => launch_client(&self.binary, &launch),
            Launcher::Keeper(socket) => crate::nbd::node::launch::request_keeper(socket, &launch),
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
        crate::blocking::run_blocking_on(self, f).await
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
            let kernel_launch = |k: &KernelDevices| {
                Some(KernelLaunch {
                    backend: k.backend(&volume),
                    read_only,
                })
            };
            if let Some(existing) = t.kernel_devices.find(&volume)? {
                // Its supervisor may have ended with an old plugin: one adopts it.
                let files = t.kernel_devices.files(&volume);
                if !files
                    .supervised()
                    .map_err(sys_err("lock", &existing.path))?
                {
                    t.start_client(&volume, &address, &export, kernel_launch(&t.kernel_devices))?;
                }
                return Ok(existing);
            }
            if let Some(k) = &t.kernel {
                t.start_client(&volume, &address, &export, kernel_launch(k))?;
                return k.find(&volume)?.ok_or_else(|| TransportError::NbdClient {
                    volume: volume.clone(),
                    reason: "the client reported its device ready, but sysfs does not list it"
                        .into(),
                });
            }
            if !t.client_alive(&volume)? {
                t.start_client(&volume, &address, &export, None)?;
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
        let v = volume.clone();
        if let Some(d) = self.blocking(move |t| t.kernel_devices.find(&v)).await? {
            return Ok(Some(d));
        }
        self.loops.find_device(volume).await
    }

    async fn disconnect(&self, device: &Device) -> Result<(), TransportError> {
        let device = device.clone();
        self.blocking(move |t| {
            if crate::nbd::node::kernel::index_of(&device.path).is_some() {
                return t.kernel_devices.disconnect(&device);
            }
            t.loops.detach(&device.path)?;
            let mnt = t.disks.mountpoint(&device.volume_id);
            unmount(&mnt)?;
            let _ = std::fs::remove_dir(&mnt);
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Device>, TransportError> {
        let mut devices = self.blocking(|t| t.kernel_devices.list()).await?;
        devices.extend(self.loops.list().await?);
        Ok(devices)
    }

    async fn refresh_capacity(&self, device: &Device) -> Result<(), TransportError> {
        if crate::nbd::node::kernel::index_of(&device.path).is_some() {
            let device = device.clone();
            return self
                .blocking(move |t| t.kernel_devices.refresh_capacity(&device, t.io_timeout))
                .await;
        }
        // A stat makes the client ask the target for the size, so the kernel's view of
        // the file grows before the loop device re-reads it.
        let disk = self.disks.disk(&device.volume_id);
        tokio::fs::metadata(&disk)
            .await
            .map_err(sys_err("stat", &disk))?;
        self.loops.refresh_capacity(device).await
    }

    async fn probe(&self) -> Result<(), TransportError> {
        if self.kernel.is_some() {
            return crate::nbd::node::netlink::NbdNetlink::open()
                .map(drop)
                .map_err(sys_err("netlink", Path::new("nbd")));
        }
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
