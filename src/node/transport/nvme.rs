//! The `nvme-tcp` transport, without nvme-cli: connect by writing an option string to
//! `/dev/nvme-fabrics` and reading `instance=N,cntlid=M` back from the same fd, find the
//! namespace by its UUID in sysfs (plain and native-multipath layouts), disconnect
//! through `delete_controller`. Only subsystems under the driver's managed NQN prefix are
//! ever touched: an orphan cleaner that disconnects a host's root disk is a known bug
//! class in this field. Kernel paths are injected so tests run against fake trees.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{sys_err, Device, Transport, TransportError};
use crate::export::ExportInfo;
use crate::ids::VolumeId;

/// Kernel paths, injected for tests.
#[derive(Debug, Clone)]
pub struct NvmePaths {
    pub sys_class_nvme: PathBuf,
    pub sys_block: PathBuf,
    pub dev: PathBuf,
}

impl Default for NvmePaths {
    fn default() -> Self {
        NvmePaths {
            sys_class_nvme: "/sys/class/nvme".into(),
            sys_block: "/sys/block".into(),
            dev: "/dev".into(),
        }
    }
}

/// The fabrics control file: one write of the options, one read of the answer.
pub trait Fabrics: std::fmt::Debug + Send + Sync + 'static {
    fn connect(&self, options: &str) -> std::io::Result<String>;
}

/// The kernel's `/dev/nvme-fabrics`.
#[derive(Debug)]
pub struct DevFabrics(pub PathBuf);

impl Fabrics for DevFabrics {
    fn connect(&self, options: &str) -> std::io::Result<String> {
        let mut f = OpenOptions::new().read(true).write(true).open(&self.0)?;
        f.write_all(options.as_bytes())?;
        let mut buf = [0u8; 256];
        let n = f.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// This host's NVMe identity. Without a stable one the kernel makes up a new host NQN
/// each boot and target ACLs never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub nqn: String,
    pub id: String,
}

impl HostIdentity {
    /// `<etc_nvme>/hostnqn` and `hostid` when present (what nvme-cli uses), else our own
    /// pair, generated once and kept in `own_dir`.
    pub fn load_or_create(etc_nvme: &Path, own_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(own_dir)?;
        let read = |dir: &Path, name: &str| {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let id = match read(etc_nvme, "hostid").or_else(|| read(own_dir, "hostid")) {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                crate::durable::write_atomic(&own_dir.join("hostid"), id.as_bytes())?;
                id
            }
        };
        let nqn = match read(etc_nvme, "hostnqn").or_else(|| read(own_dir, "hostnqn")) {
            Some(nqn) => nqn,
            None => {
                let nqn = format!("nqn.2014-08.org.nvmexpress:uuid:{id}");
                crate::durable::write_atomic(&own_dir.join("hostnqn"), nqn.as_bytes())?;
                nqn
            }
        };
        Ok(HostIdentity { nqn, id })
    }
}

/// Connection tunables; `ctrl_loss_tmo` comes with each export (per StorageClass).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub reconnect_delay: u32,
    pub fast_io_fail_tmo: u32,
    pub keep_alive_tmo: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            reconnect_delay: 10,
            fast_io_fail_tmo: 30,
            keep_alive_tmo: 5,
        }
    }
}

/// A value that may go into the comma-separated fabrics option string: anything with
/// `,` or `=` would add options of its own (publish_context is input).
fn option_safe(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 223
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
}

/// The option string written to the fabrics file; None for anything but a well-formed
/// NVMe/TCP export.
pub fn connect_options(export: &ExportInfo, host: &HostIdentity, t: &Timeouts) -> Option<String> {
    let ExportInfo::NvmeTcp {
        address,
        port,
        subsystem_nqn,
        ctrl_loss_tmo,
        host_nqn,
        ..
    } = export
    else {
        return None;
    };
    // A target with host ACLs names the host it admits; connect as that host.
    let derived;
    let host = match host_nqn {
        Some(nqn) => {
            derived = HostIdentity {
                nqn: nqn.clone(),
                id: crate::export::host_id_of(nqn),
            };
            &derived
        }
        None => host,
    };
    if ![address, subsystem_nqn, &host.nqn, &host.id]
        .iter()
        .all(|v| option_safe(v))
    {
        return None;
    }
    Some(format!(
        "transport=tcp,traddr={address},trsvcid={port},nqn={subsystem_nqn},hostnqn={},hostid={},ctrl_loss_tmo={ctrl_loss_tmo},reconnect_delay={},fast_io_fail_tmo={},keep_alive_tmo={}",
        host.nqn, host.id, t.reconnect_delay, t.fast_io_fail_tmo, t.keep_alive_tmo
    ))
}

/// `instance=N,cntlid=M` → (N, M).
pub fn parse_connect_reply(reply: &str) -> Option<(u32, u32)> {
    let (mut instance, mut cntlid) = (None, None);
    for part in reply.trim().split(',') {
        match part.split_once('=')? {
            ("instance", v) => instance = v.parse().ok(),
            ("cntlid", v) => cntlid = v.parse().ok(),
            _ => {}
        }
    }
    Some((instance?, cntlid?))
}

/// Leading ASCII digits of `s` and the rest; None when there are none.
fn split_digits(s: &str) -> Option<(&str, &str)> {
    let n = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (n > 0).then(|| s.split_at(n))
}

/// `nvmeXcYnZ` (a native-multipath path) → `nvmeXnZ` (its head); a plain `nvmeXnZ` stays.
/// Anything else (controllers, partitions) → None.
fn head_of(name: &str) -> Option<String> {
    let (subsys, rest) = split_digits(name.strip_prefix("nvme")?)?;
    let rest = match rest.strip_prefix('c') {
        Some(r) => split_digits(r)?.1,
        None => rest,
    };
    let (nsid, tail) = split_digits(rest.strip_prefix('n')?)?;
    tail.is_empty().then(|| format!("nvme{subsys}n{nsid}"))
}

/// The kernel's uevent multicast (what udev listens to): a wake-up when devices appear.
struct Uevents(std::os::fd::OwnedFd);

impl Uevents {
    fn open() -> Option<Uevents> {
        use nix::sys::socket::{
            bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .ok()?;
        // Group 1: the kernel's own events.
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 1),
        )
        .ok()?;
        Some(Uevents(fd))
    }

    /// Returns after an event arrived or `timeout`, whichever is first; drains events.
    fn wait(&self, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, t).unwrap_or(0) > 0 {
            let mut buf = [0u8; 8192];
            while nix::unistd::read(&self.0, &mut buf).is_ok_and(|n| n > 0) {}
        }
    }
}

#[derive(Debug, Clone)]
pub struct NvmeTransport {
    paths: NvmePaths,
    fabrics: Arc<dyn Fabrics>,
    host: HostIdentity,
    timeouts: Timeouts,
    /// Subsystem NQNs of this driver are `<prefix><volume id>` for one of these
    /// (ours for nvmet, RouterOS's for rds); nothing else is touched.
    prefixes: Vec<String>,
    /// How long a new namespace may take to appear.
    wait: Duration,
    /// Host NQNs this node connects as (its identity, and the one derived from its node
    /// id that ACL'd targets admit): only controllers of these are this node's.
    own_hosts: Vec<String>,
}

impl NvmeTransport {
    pub fn new(
        paths: NvmePaths,
        fabrics: Arc<dyn Fabrics>,
        host: HostIdentity,
        prefixes: &[&str],
        wait: Duration,
    ) -> Self {
        NvmeTransport {
            paths,
            fabrics,
            own_hosts: vec![host.nqn.clone()],
            host,
            timeouts: Timeouts::default(),
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            wait,
        }
    }

    /// Also counts controllers connected as `nqn` (the node-derived host NQN) as ours.
    pub fn with_own_host(mut self, nqn: String) -> Self {
        if !self.own_hosts.contains(&nqn) {
            self.own_hosts.push(nqn);
        }
        self
    }

    /// Whether a controller connected as `host` is this node's. Another host's
    /// controller of the same subsystem (a second initiator in this kernel, a stale
    /// identity) is never used, reused or disconnected. A kernel that does not say
    /// (no `hostnqn` attribute) is taken as ours.
    fn is_own(&self, host: Option<&str>, want: Option<&str>) -> bool {
        match (host, want) {
            (None, _) => true,
            (Some(h), Some(w)) => h == w,
            (Some(h), None) => self.own_hosts.iter().any(|o| o == h),
        }
    }

    /// Whether `nqn` is the volume's own subsystem under a managed prefix.
    fn is_subsystem_of(&self, nqn: &str, volume: &VolumeId) -> bool {
        self.volume_of(nqn).as_ref() == Some(volume)
    }

    fn volume_of(&self, nqn: &str) -> Option<VolumeId> {
        self.prefixes
            .iter()
            .find_map(|p| VolumeId::parse(nqn.strip_prefix(p.as_str())?).ok())
    }

    /// (controller name, subsystem NQN) of this node's NVMe controllers: those
    /// connected as `host` when given, else as any of its own host NQNs.
    fn controllers_as(&self, host: Option<&str>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.paths.sys_class_nvme)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(nqn) = std::fs::read_to_string(entry.path().join("subsysnqn")) {
                let hostnqn = std::fs::read_to_string(entry.path().join("hostnqn")).ok();
                if self.is_own(hostnqn.as_deref().map(str::trim), host) {
                    out.push((name, nqn.trim().to_owned()));
                }
            }
        }
        out.sort();
        out
    }

    fn controllers(&self) -> Vec<(String, String)> {
        self.controllers_as(None)
    }

    /// Namespace block devices (heads) reached through controller `ctrl`.
    fn namespaces(&self, ctrl: &str) -> Vec<String> {
        let mut heads: Vec<String> = std::fs::read_dir(self.paths.sys_class_nvme.join(ctrl))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| head_of(&e.file_name().to_string_lossy()))
            .collect();
        heads.sort();
        heads.dedup();
        heads
    }

    /// The device of namespace `uuid` in subsystem `nqn`, if connected. An empty `uuid`
    /// (RouterOS does not say its namespaces' UUIDs) means the subsystem's one namespace.
    fn find(&self, nqn: &str, uuid: &str, host: &str) -> Option<PathBuf> {
        self.controllers_as(Some(host))
            .into_iter()
            .filter(|(_, n)| n == nqn)
            .flat_map(|(ctrl, _)| self.namespaces(&ctrl))
            .find(|head| {
                uuid.is_empty()
                    || std::fs::read_to_string(self.paths.sys_block.join(head).join("uuid"))
                        .is_ok_and(|u| u.trim().eq_ignore_ascii_case(uuid))
            })
            .map(|head| self.paths.dev.join(head))
    }

    /// Any namespace device of the volume's subsystem.
    fn device_of(&self, volume: &VolumeId) -> Option<Device> {
        let head = self
            .controllers()
            .into_iter()
            .filter(|(_, n)| self.is_subsystem_of(n, volume))
            .flat_map(|(ctrl, _)| self.namespaces(&ctrl))
            .next()?;
        Some(Device {
            volume_id: volume.clone(),
            path: self.paths.dev.join(head),
            backing_deleted: false,
        })
    }

    fn connect_blocking(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
    ) -> Result<Device, TransportError> {
        let ExportInfo::NvmeTcp {
            subsystem_nqn,
            namespace_uuid,
            ..
        } = export
        else {
            return Err(TransportError::Unsupported(export.transport_name()));
        };
        // publish_context is input: only this volume's own subsystem, under our prefix.
        if !self.is_subsystem_of(subsystem_nqn, volume) {
            return Err(TransportError::ForeignSubsystem {
                volume: volume.clone(),
                nqn: subsystem_nqn.clone(),
            });
        }
        let device = |path| Device {
            volume_id: volume.clone(),
            path,
            backing_deleted: false,
        };
        // The host this connect is made as: the one the target admits, else our own.
        let as_host = match export {
            ExportInfo::NvmeTcp {
                host_nqn: Some(h), ..
            } => h.clone(),
            _ => self.host.nqn.clone(),
        };
        if let Some(path) = self.find(subsystem_nqn, namespace_uuid, &as_host) {
            return Ok(device(path));
        }
        let connected = self
            .controllers_as(Some(&as_host))
            .iter()
            .any(|(_, n)| n == subsystem_nqn);
        // Listen for the kernel's uevents before connecting, so the namespace's "add"
        // cannot slip by between the connect and the first look.
        let uevents = Uevents::open();
        if !connected {
            let options = connect_options(export, &self.host, &self.timeouts).ok_or_else(|| {
                TransportError::NvmeConnect {
                    volume: volume.clone(),
                    reason: "publish_context has an address or host NQN that cannot go into a fabrics option string".into(),
                }
            })?;
            let fabrics = Path::new("/dev/nvme-fabrics");
            let reply = self.fabrics.connect(&options).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    TransportError::NvmeConnect {
                        volume: volume.clone(),
                        reason: "/dev/nvme-fabrics is missing: load the nvme-tcp kernel module on this node (modprobe nvme-tcp)".into(),
                    }
                } else {
                    sys_err("connect through", fabrics)(e)
                }
            })?;
            let (instance, cntlid) =
                parse_connect_reply(&reply).ok_or_else(|| TransportError::NvmeConnect {
                    volume: volume.clone(),
                    reason: format!("unexpected answer {:?}", reply.trim()),
                })?;
            tracing::info!(volume_id = %volume, controller = %format!("nvme{instance}"), cntlid, "NVMe/TCP controller connected");
        }
        // The namespace appears once the kernel has scanned it: wait, boundedly, woken by
        // each uevent, looking again at growing intervals in any case (uevents may be
        // unavailable, or not about our device).
        let deadline = Instant::now() + self.wait;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(path) = self.find(subsystem_nqn, namespace_uuid, &as_host) {
                return Ok(device(path));
            }
            if Instant::now() >= deadline {
                return Err(TransportError::NvmeConnect {
                    volume: volume.clone(),
                    reason: format!(
                        "namespace {namespace_uuid} did not appear within {:?}",
                        self.wait
                    ),
                });
            }
            let wait = pause.min(deadline.saturating_duration_since(Instant::now()));
            match &uevents {
                Some(u) => u.wait(wait),
                None => std::thread::sleep(wait),
            }
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Writes `1` to `delete_controller` of every controller of the volume's subsystem.
    fn disconnect_blocking(&self, volume: &VolumeId) -> Result<(), TransportError> {
        for (ctrl, n) in self.controllers() {
            // Never a controller outside the managed prefixes, whatever was asked.
            if !self.is_subsystem_of(&n, volume) {
                continue;
            }
            let path = self
                .paths
                .sys_class_nvme
                .join(&ctrl)
                .join("delete_controller");
            match std::fs::write(&path, "1") {
                Ok(()) => {}
                // Gone meanwhile: already disconnected.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(sys_err("write", &path)(e)),
            }
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&NvmeTransport) -> Result<T, TransportError> + Send + 'static,
    ) -> Result<T, TransportError> {
        crate::blocking::run_blocking_on(self, f).await
    }
}

#[async_trait]
impl Transport for NvmeTransport {
    async fn connect(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
        _read_only: bool,
    ) -> Result<Device, TransportError> {
        let (volume, export) = (volume.clone(), export.clone());
        self.blocking(move |t| t.connect_blocking(&volume, &export))
            .await
    }

    async fn find_device(&self, volume: &VolumeId) -> Result<Option<Device>, TransportError> {
        let volume = volume.clone();
        self.blocking(move |t| Ok(t.device_of(&volume))).await
    }

    async fn disconnect(&self, device: &Device) -> Result<(), TransportError> {
        let volume = device.volume_id.clone();
        self.blocking(move |t| t.disconnect_blocking(&volume)).await
    }

    async fn list(&self) -> Result<Vec<Device>, TransportError> {
        self.blocking(|t| {
            let mut volumes: Vec<VolumeId> = t
                .controllers()
                .into_iter()
                .filter_map(|(_, nqn)| t.volume_of(&nqn))
                .collect();
            volumes.sort();
            volumes.dedup();
            Ok(volumes.iter().filter_map(|v| t.device_of(v)).collect())
        })
        .await
    }

    async fn refresh_capacity(&self, device: &Device) -> Result<(), TransportError> {
        let volume = device.volume_id.clone();
        self.blocking(move |t| {
            for (ctrl, n) in t.controllers() {
                if t.is_subsystem_of(&n, &volume) {
                    let path = t.paths.sys_class_nvme.join(&ctrl).join("rescan_controller");
                    std::fs::write(&path, "1").map_err(sys_err("write", &path))?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn probe(&self) -> Result<(), TransportError> {
        let dir = self.paths.sys_class_nvme.clone();
        self.blocking(move |_| {
            std::fs::read_dir(&dir)
                .map(drop)
                .map_err(sys_err("list", &dir))
        })
        .await
    }
}

#[cfg(test)]
mod tests;
