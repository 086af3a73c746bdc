//! The `loop` transport: attaches an image file to a loop device through ioctls
//! (LOOP_CTL_GET_FREE + LOOP_CONFIGURE), always with direct I/O so that two nodes sharing
//! the image over NFS/CephFS never serve each other stale page-cache data.
//! The kernel is the source of truth: sysfs `loop/backing_file` tells which device holds
//! which image, so a restarted plugin finds its devices without any state file.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{sys_err, Device, Transport, TransportError};
use crate::backend::file::Layout;
use crate::export::ExportInfo;
use crate::ids::VolumeId;

// linux/loop.h
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// Kernel paths are injected so tests can point at fake trees.
#[derive(Debug, Clone)]
pub struct LoopPaths {
    pub sys_block: PathBuf,
    pub dev: PathBuf,
    /// Reads the owner tag of a loop device (LOOP_GET_STATUS64's lo_file_name).
    pub read_tag: fn(&Path) -> Option<String>,
}

impl Default for LoopPaths {
    fn default() -> Self {
        LoopPaths {
            sys_block: PathBuf::from("/sys/block"),
            dev: PathBuf::from("/dev"),
            read_tag: read_tag_ioctl,
        }
    }
}

/// Owner tag of a bound loop device, from the kernel.
fn read_tag_ioctl(device: &Path) -> Option<String> {
    let dev = File::open(device).ok()?;
    // SAFETY: LoopInfo64 is plain old data; the kernel fills it in.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    ioctl(
        &dev,
        LOOP_GET_STATUS64,
        &mut info as *mut LoopInfo64 as libc::c_ulong,
    )
    .ok()?;
    let end = info
        .lo_file_name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(LO_NAME_SIZE);
    Some(String::from_utf8_lossy(&info.lo_file_name[..end]).into_owned())
}

/// The tag written into every loop device this node plugin creates. Several node
/// plugins can share one kernel (tests, the demo, a node running two drivers), and
/// anyone may attach the same image by hand: each plugin adopts and detaches only
/// devices that carry its own tag.
pub fn owner_tag(node_id: &str) -> String {
    const PREFIX: &str = "handoff-csi:";
    if PREFIX.len() + node_id.len() < LO_NAME_SIZE {
        format!("{PREFIX}{node_id}")
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(node_id.as_bytes());
        let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        format!("{PREFIX}{hex}")
    }
}

/// Which backing files are volumes' images: the loop transport attaches, finds and
/// adopts only those.
pub trait ImageNames: std::fmt::Debug + Send + Sync + 'static {
    /// The volume whose image `path` is, if it is exactly one.
    fn volume_of(&self, path: &Path) -> Option<VolumeId>;
    /// The directory the images live in (the Probe checks it is reachable).
    fn home(&self) -> &Path;
}

impl ImageNames for Layout {
    fn volume_of(&self, path: &Path) -> Option<VolumeId> {
        self.volume_of_image(path)
    }
    fn home(&self) -> &Path {
        self.volumes_dir()
    }
}

#[derive(Debug, Clone)]
pub struct LoopTransport {
    images: std::sync::Arc<dyn ImageNames>,
    paths: LoopPaths,
    tag: String,
}

fn ioctl(fd: &File, request: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<libc::c_int> {
    // SAFETY: callers pass either an integer or a pointer to a live, correctly laid out
    // struct for `request`; the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl LoopTransport {
    /// `data_dir` must be canonical (sysfs reports resolved paths); `owner` is the node id.
    pub fn new(data_dir: &Path, paths: LoopPaths, owner: &str) -> Self {
        Self::for_images(std::sync::Arc::new(Layout::new(data_dir)), paths, owner)
    }

    /// A loop transport over other backing files (the NBD plane's FUSE disks).
    pub fn for_images(
        images: std::sync::Arc<dyn ImageNames>,
        paths: LoopPaths,
        owner: &str,
    ) -> Self {
        LoopTransport {
            images,
            paths,
            tag: owner_tag(owner),
        }
    }

    pub(crate) fn scan(&self) -> Result<Vec<Device>, TransportError> {
        let dir = &self.paths.sys_block;
        let mut devices = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(sys_err("list", dir))? {
            let entry = entry.map_err(sys_err("list", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
                continue;
            };
            // Absent for unbound devices; a device can also unbind while we look.
            let Ok(raw) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
                continue;
            };
            let raw = raw.trim_end_matches('\n');
            let (path, backing_deleted) = match raw.strip_suffix(" (deleted)") {
                Some(p) => (p, true),
                None => (raw, false),
            };
            let Some(volume_id) = self.images.volume_of(Path::new(path)) else {
                continue;
            };
            let device = self.paths.dev.join(name);
            if (self.paths.read_tag)(&device).as_deref() == Some(self.tag.as_str()) {
                devices.push(Device {
                    volume_id,
                    path: device,
                    backing_deleted,
                });
            }
        }
        Ok(devices)
    }

    fn dio_enabled(&self, device: &Path) -> bool {
        let name = device.file_name().unwrap_or_default();
        std::fs::read_to_string(self.paths.sys_block.join(name).join("loop/dio"))
            .is_ok_and(|s| s.trim() == "1")
    }

    pub(crate) fn attach(&self, image: &Path, read_only: bool) -> Result<PathBuf, TransportError> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(image)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TransportError::ImageMissing(image.to_path_buf()),
                // open(2) answers EINVAL for O_DIRECT on a filesystem without it (tmpfs
                // before Linux 6.6, some FUSE mounts): the same refusal as a loop device
                // that would not take direct I/O.
                _ if e.raw_os_error() == Some(libc::EINVAL) => {
                    TransportError::DirectIoUnavailable {
                        device: PathBuf::from("(none yet)"),
                        image: image.to_path_buf(),
                    }
                }
                _ => sys_err("open image", image)(e),
            })?;
        let ctl_path = self.paths.dev.join("loop-control");
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ctl_path)
            .map_err(sys_err("open", &ctl_path))?;

        // SAFETY: LoopInfo64 is plain old data; all-zero is its empty value.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        info.lo_flags = LO_FLAGS_DIRECT_IO | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
        let tag = self.tag.as_bytes();
        info.lo_file_name[..tag.len()].copy_from_slice(tag);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            // 0: the kernel matches the backing device's logical block size for direct I/O.
            block_size: 0,
            info,
            reserved: [0; 8],
        };

        const ATTEMPTS: u32 = 16;
        for _ in 0..ATTEMPTS {
            let index = ioctl(&ctl, LOOP_CTL_GET_FREE, 0)
                .map_err(sys_err("LOOP_CTL_GET_FREE", &ctl_path))?;
            let device = self.paths.dev.join(format!("loop{index}"));
            let dev = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&device)
                .map_err(sys_err("open", &device))?;
            match ioctl(
                &dev,
                LOOP_CONFIGURE,
                &config as *const LoopConfig as libc::c_ulong,
            ) {
                Ok(_) => {
                    if !self.dio_enabled(&device) {
                        let _ = ioctl(&dev, LOOP_CLR_FD, 0);
                        return Err(TransportError::DirectIoUnavailable {
                            device,
                            image: image.to_path_buf(),
                        });
                    }
                    return Ok(device);
                }
                // Another process bound this free device between our two calls.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                Err(e) => return Err(sys_err("LOOP_CONFIGURE", &device)(e)),
            }
        }
        Err(TransportError::NoFreeDevice { attempts: ATTEMPTS })
    }

    pub(crate) fn detach(&self, device: &Path) -> Result<(), TransportError> {
        let dev = match OpenOptions::new().read(true).open(device) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(sys_err("open", device)(e)),
        };
        match ioctl(&dev, LOOP_CLR_FD, 0) {
            // ENXIO: nothing bound any more, someone already detached it.
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(e) => Err(sys_err("LOOP_CLR_FD", device)(e)),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LoopTransport) -> Result<T, TransportError> + Send + 'static,
    ) -> Result<T, TransportError> {
        crate::blocking::run_blocking_on(self, f).await
    }
}

#[async_trait]
impl Transport for LoopTransport {
    async fn connect(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
        read_only: bool,
    ) -> Result<Device, TransportError> {
        let ExportInfo::LocalFile { path } = export else {
            return Err(TransportError::Unsupported(export.transport_name()));
        };
        // publish_context is input: attach nothing but this volume's own image.
        if self.images.volume_of(path).as_ref() != Some(volume) {
            return Err(TransportError::ForeignImage {
                volume: volume.clone(),
                path: path.clone(),
            });
        }
        let (volume, image) = (volume.clone(), path.clone());
        self.blocking(move |t| {
            if let Some(existing) = t.scan()?.into_iter().find(|d| d.volume_id == volume) {
                return Ok(existing);
            }
            let path = t.attach(&image, read_only)?;
            Ok(Device {
                volume_id: volume,
                path,
                backing_deleted: false,
            })
        })
        .await
    }

    async fn find_device(&self, volume: &VolumeId) -> Result<Option<Device>, TransportError> {
        let volume = volume.clone();
        self.blocking(move |t| Ok(t.scan()?.into_iter().find(|d| d.volume_id == volume)))
            .await
    }

    async fn disconnect(&self, device: &Device) -> Result<(), TransportError> {
        let path = device.path.clone();
        self.blocking(move |t| t.detach(&path)).await
    }

    async fn list(&self) -> Result<Vec<Device>, TransportError> {
        self.blocking(|t| t.scan()).await
    }

    async fn refresh_capacity(&self, device: &Device) -> Result<(), TransportError> {
        let path = device.path.clone();
        self.blocking(move |_| {
            let dev = File::open(&path).map_err(sys_err("open", &path))?;
            // The kernel re-reads the backing file's size and resizes the block device.
            ioctl(&dev, LOOP_SET_CAPACITY, 0).map_err(sys_err("LOOP_SET_CAPACITY", &path))?;
            Ok(())
        })
        .await
    }

    async fn probe(&self) -> Result<(), TransportError> {
        self.blocking(|t| {
            let ctl = t.paths.dev.join("loop-control");
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&ctl)
                .map_err(sys_err("open", &ctl))?;
            let home = t.images.home();
            std::fs::read_dir(home)
                .map(drop)
                .map_err(sys_err("list image directory", home))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys/block with two loop devices of ours, one foreign, one unbound.
    #[tokio::test]
    async fn scan_finds_our_devices_in_a_fake_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let data = Path::new("/srv/handoff");
        let layout = Layout::new(data);
        let (a, b) = (VolumeId::generate(), VolumeId::generate());
        let entries = [
            ("loop0", Some(format!("{}\n", layout.image(&a).display()))),
            ("loop1", Some("/home/user/disk.img\n".to_string())),
            ("loop2", None),
            (
                "loop7",
                Some(format!("{} (deleted)\n", layout.image(&b).display())),
            ),
            ("sda", Some(format!("{}\n", layout.image(&a).display()))),
        ];
        for (name, backing) in entries {
            let dir = sys.path().join(name).join("loop");
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(b) = backing {
                std::fs::write(dir.join("backing_file"), b).unwrap();
            }
        }
        // The fake "tag" of loopN is the file dev/loopN.tag in the fake tree.
        fn fake_tag(device: &Path) -> Option<String> {
            std::fs::read_to_string(device.with_extension("tag")).ok()
        }
        let dev = sys.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        for (name, owner) in [
            ("loop0", "node-a"),
            ("loop7", "node-a"),
            ("loop3", "node-b"),
        ] {
            std::fs::write(dev.join(format!("{name}.tag")), owner_tag(owner)).unwrap();
        }
        let t = LoopTransport::new(
            data,
            LoopPaths {
                sys_block: sys.path().to_path_buf(),
                dev: dev.clone(),
                read_tag: fake_tag,
            },
            "node-a",
        );
        let mut found = t.list().await.unwrap();
        found.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].path, dev.join("loop0"));
        assert_eq!(found[0].volume_id, a);
        assert!(!found[0].backing_deleted);
        assert_eq!(found[1].path, dev.join("loop7"));
        assert!(found[1].backing_deleted);
        assert_eq!(
            t.find_device(&b).await.unwrap().unwrap().path,
            dev.join("loop7")
        );
    }

    #[test]
    fn owner_tags_fit_the_kernel_field() {
        assert_eq!(owner_tag("node-a"), "handoff-csi:node-a");
        let long = owner_tag(&"n".repeat(128));
        assert!(long.len() < LO_NAME_SIZE, "{long}");
        assert_ne!(long, owner_tag(&"m".repeat(128)));
    }

    #[tokio::test]
    async fn connect_refuses_images_outside_the_data_dir() {
        let t = LoopTransport::new(Path::new("/srv/handoff"), LoopPaths::default(), "node-a");
        let v = VolumeId::generate();
        for path in ["/etc/shadow", "/srv/handoff/volumes/../../../etc/shadow"] {
            let err = t
                .connect(&v, &ExportInfo::LocalFile { path: path.into() }, false)
                .await
                .unwrap_err();
            assert!(matches!(err, TransportError::ForeignImage { .. }), "{err}");
        }
        // Another volume's image is foreign too.
        let other = Layout::new(Path::new("/srv/handoff")).image(&VolumeId::generate());
        assert!(matches!(
            t.connect(&v, &ExportInfo::LocalFile { path: other }, false)
                .await,
            Err(TransportError::ForeignImage { .. })
        ));
    }
}
