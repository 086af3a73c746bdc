//! The `nbd` transport's kernel half: volumes on `/dev/nbd<N>` driven by nbd.ko, each
//! supervised by a `handoff-csi nbd-client --kernel-backend` process (see
//! `crate::nbd::node::kernel`). A device is this plugin's when its sysfs backend identifier is
//! `<owner tag>/<volume id>`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::loopdev::owner_tag;
use super::{sys_err, Device, TransportError};
use crate::ids::VolumeId;
use crate::nbd::node::kernel::{device_path, index_of, SupervisorFiles, SysBlock};
use crate::nbd::node::netlink::NbdNetlink;

/// How long a disconnected device may take to leave sysfs.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct KernelDevices {
    sys: SysBlock,
    /// `<owner tag>/`: the prefix of every backend identifier this plugin writes.
    prefix: String,
    run_dir: PathBuf,
}

impl KernelDevices {
    pub fn new(sys: SysBlock, owner: &str, run_dir: &Path) -> Self {
        KernelDevices {
            sys,
            prefix: format!("{}/", owner_tag(owner)),
            run_dir: run_dir.to_path_buf(),
        }
    }

    pub fn backend(&self, volume: &VolumeId) -> String {
        format!("{}{volume}", self.prefix)
    }

    pub fn files(&self, volume: &VolumeId) -> SupervisorFiles {
        SupervisorFiles::new(&self.run_dir.join(volume.as_str()))
    }

    fn scan_err(&self) -> impl FnOnce(std::io::Error) -> TransportError {
        sys_err("scan", Path::new(crate::nbd::node::kernel::SYS_BLOCK))
    }

    pub fn find(&self, volume: &VolumeId) -> Result<Option<Device>, TransportError> {
        let index = self
            .sys
            .find(&self.backend(volume))
            .map_err(self.scan_err())?;
        Ok(index.map(|i| Device {
            volume_id: volume.clone(),
            path: device_path(i),
            backing_deleted: false,
        }))
    }

    pub fn list(&self) -> Result<Vec<Device>, TransportError> {
        let found = self
            .sys
            .with_prefix(&self.prefix)
            .map_err(self.scan_err())?;
        Ok(found
            .into_iter()
            .filter_map(|(index, backend)| {
                let id = VolumeId::parse(backend.strip_prefix(&self.prefix)?).ok()?;
                Some(Device {
                    volume_id: id,
                    path: device_path(index),
                    backing_deleted: false,
                })
            })
            .collect())
    }

    /// Whether `device` is one of ours.
    pub fn holds(&self, device: &Device) -> Result<bool, TransportError> {
        Ok(index_of(&device.path).is_some()
            && self.find(&device.volume_id)?.as_ref() == Some(device))
    }

    /// Disconnects the device and waits until the kernel released it.
    pub fn disconnect(&self, device: &Device) -> Result<(), TransportError> {
        let Some(index) = index_of(&device.path) else {
            return Ok(());
        };
        let backend = self.backend(&device.volume_id);
        if self.sys.find(&backend).map_err(self.scan_err())? != Some(index) {
            self.files(&device.volume_id).remove();
            return Ok(());
        }
        let mut nl = NbdNetlink::open().map_err(sys_err("netlink", &device.path))?;
        match nl.disconnect(index) {
            // EINVAL: no such device any more.
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(sys_err("disconnect", &device.path)(e)),
        }
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        while self.sys.find(&backend).map_err(self.scan_err())? == Some(index) {
            if Instant::now() > deadline {
                return Err(TransportError::DeviceBusy {
                    device: device.path.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.files(&device.volume_id).remove();
        Ok(())
    }

    /// Has the supervisor fetch the target's size and apply it to the device.
    pub fn refresh_capacity(
        &self,
        device: &Device,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let Some(index) = index_of(&device.path) else {
            return Ok(());
        };
        let size = self
            .files(&device.volume_id)
            .refresh_size(timeout)
            .map_err(|reason| TransportError::NbdClient {
                volume: device.volume_id.clone(),
                reason,
            })?;
        let now = self.sys.size(index).map_err(self.scan_err())?;
        if now != size {
            return Err(TransportError::NbdClient {
                volume: device.volume_id.clone(),
                reason: format!(
                    "the target reports {size} bytes but {} has {now}",
                    device.path.display()
                ),
            });
        }
        Ok(())
    }
}
