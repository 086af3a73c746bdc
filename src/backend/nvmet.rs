//! Exporting images through the Linux NVMe target (nvmet) by configfs: one subsystem per
//! volume (`attr_allow_any_host=0`), its namespace backed by the image file with the
//! volume's UUID, linked to one TCP port, and an `allowed_hosts` link per published node.
//! Configfs is reached through a small trait so that tests run against a recording fake.

use std::path::{Path, PathBuf};

use crate::export::ExportInfo;
use crate::ids::VolumeId;

/// The configfs operations nvmet set-up needs.
pub trait ConfigFs: std::fmt::Debug + Send + Sync + 'static {
    fn mkdir(&self, path: &Path) -> std::io::Result<()>;
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()>;
    fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()>;
    fn unlink(&self, link: &Path) -> std::io::Result<()>;
    fn rmdir(&self, path: &Path) -> std::io::Result<()>;
    /// Whether `path` exists. An error is "could not ask", never "absent": on the way to a
    /// fence or a delete that difference decides whether a node can still write.
    fn exists(&self, path: &Path) -> std::io::Result<bool>;
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// Entry names of a directory (empty when it does not exist; an error otherwise).
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>>;
}

/// The kernel's configfs (`/sys/kernel/config`): directories made there get their
/// attribute files and default groups (`namespaces`, `allowed_hosts`) from the kernel.
/// On a plain directory standing in for it (tests, dry runs) those are made and removed
/// by hand instead; on configfs itself that never happens.
#[derive(Debug, Default)]
pub struct KernelConfigFs;

const CONFIGFS_MAGIC: i64 = 0x6265_6570;

/// Whether `path` (or its nearest existing ancestor) is on a plain filesystem.
fn plain(path: &Path) -> bool {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    // The field's width differs between libcs.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(existing)
        .map(|s| s.filesystem_type().0 as i64 != CONFIGFS_MAGIC)
        .unwrap_or(false)
}

impl ConfigFs for KernelConfigFs {
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        if plain(path) {
            return std::fs::create_dir_all(path);
        }
        std::fs::create_dir(path)
    }
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        std::fs::write(path, value)
    }
    fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()> {
        if let Some(parent) = link.parent().filter(|p| !p.exists() && plain(p)) {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink(target, link)
    }
    fn unlink(&self, link: &Path) -> std::io::Result<()> {
        std::fs::remove_file(link)
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        if plain(path) {
            return std::fs::remove_dir_all(path);
        }
        std::fs::remove_dir(path)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        match path.symlink_metadata() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        entries
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    }
}

/// nvmet's configfs on a storage host reached over SSH: each operation one shell
/// command, every path and value single-quoted. Runs on a blocking thread (as the
/// local one does) and waits there for the asynchronous shell.
pub struct RemoteConfigFs {
    shell: std::sync::Arc<dyn crate::backend::ssh::CommandShell>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RemoteConfigFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoteConfigFs")
    }
}

/// `'…'` for a POSIX shell: the only character needing care inside is `'` itself.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl RemoteConfigFs {
    /// Must be created inside the runtime the shell's connection lives on.
    pub fn new(shell: std::sync::Arc<dyn crate::backend::ssh::CommandShell>) -> Self {
        RemoteConfigFs {
            shell,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `command`; a non-zero exit comes back as an error with what it printed.
    fn run(&self, command: String) -> std::io::Result<String> {
        // The marker line carries the exit status: shells print nothing on success.
        let wrapped = format!("{command}; echo \"handoff-status=$?\"");
        let out = self
            .runtime
            .block_on(self.shell.run(&wrapped))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let (body, status) = out
            .trim_end()
            .rsplit_once("handoff-status=")
            .ok_or_else(|| std::io::Error::other(format!("no exit status in {out:?}")))?;
        match status.trim() {
            "0" => Ok(body.to_owned()),
            code => {
                let text = body.trim();
                let kind = if text.contains("No such file") {
                    std::io::ErrorKind::NotFound
                } else {
                    std::io::ErrorKind::Other
                };
                Err(std::io::Error::new(kind, format!("exit {code}: {text}")))
            }
        }
    }

    fn path(p: &Path) -> String {
        sh_quote(&p.display().to_string())
    }
}

impl ConfigFs for RemoteConfigFs {
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        self.run(format!("mkdir -- {} 2>&1", Self::path(path)))
            .map(drop)
    }
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        self.run(format!(
            "printf '%s' {} > {} 2>&1",
            sh_quote(value),
            Self::path(path)
        ))
        .map(drop)
    }
    fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()> {
        self.run(format!(
            "ln -s -- {} {} 2>&1",
            Self::path(target),
            Self::path(link)
        ))
        .map(drop)
    }
    fn unlink(&self, link: &Path) -> std::io::Result<()> {
        self.run(format!("rm -- {} 2>&1", Self::path(link)))
            .map(drop)
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        self.run(format!("rmdir -- {} 2>&1", Self::path(path)))
            .map(drop)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        // The answer is printed, so a lost session or a failing shell is an error, not
        // "absent".
        let p = Self::path(path);
        let out = self.run(format!(
            "if test -e {p} || test -L {p}; then echo present; else echo absent; fi"
        ))?;
        match out.trim() {
            "present" => Ok(true),
            "absent" => Ok(false),
            other => Err(std::io::Error::other(format!(
                "unexpected answer {other:?} to an existence check of {}",
                path.display()
            ))),
        }
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.run(format!("cat -- {} 2>&1", Self::path(path)))
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        let p = Self::path(dir);
        self.run(format!("if test -d {p}; then ls -1A -- {p} 2>&1; fi"))
            .map(|out| out.lines().map(str::to_owned).collect())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("nvmet {op} {path:?}: {source}")]
pub struct NvmetError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Where nodes reach this target.
#[derive(Debug, Clone)]
pub struct PortConfig {
    pub id: u16,
    pub address: String,
    pub port: u16,
    /// ipv4 or ipv6.
    pub family: &'static str,
}

#[derive(Debug)]
pub struct Nvmet<F: ConfigFs> {
    fs: F,
    /// `<configfs>/nvmet`.
    root: PathBuf,
    port: PortConfig,
    /// Subsystem NQNs are `<prefix><volume id>`.
    prefix: String,
}

/// Only NQN-safe text reaches a configfs path (volume ids and host NQNs are checked
/// before; this is the last line).
fn component(s: &str) -> bool {
    !s.is_empty()
        && !s.contains('/')
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_graphic())
}

impl<F: ConfigFs> Nvmet<F> {
    pub fn new(fs: F, root: PathBuf, port: PortConfig, prefix: &str) -> Self {
        Nvmet {
            fs,
            root,
            port,
            prefix: prefix.to_owned(),
        }
    }

    pub fn nqn(&self, volume: &VolumeId) -> String {
        format!("{}{volume}", self.prefix)
    }

    fn subsystem(&self, volume: &VolumeId) -> PathBuf {
        self.root.join("subsystems").join(self.nqn(volume))
    }

    fn port_dir(&self) -> PathBuf {
        self.root.join("ports").join(self.port.id.to_string())
    }

    fn port_link(&self, volume: &VolumeId) -> PathBuf {
        self.port_dir().join("subsystems").join(self.nqn(volume))
    }

    fn exists(&self, path: &Path) -> Result<bool, NvmetError> {
        self.fs.exists(path).map_err(|source| NvmetError {
            op: "stat",
            path: path.to_path_buf(),
            source,
        })
    }

    fn mkdir(&self, path: &Path) -> Result<(), NvmetError> {
        if self.exists(path)? {
            return Ok(());
        }
        self.fs.mkdir(path).map_err(|source| NvmetError {
            op: "mkdir",
            path: path.to_path_buf(),
            source,
        })
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), NvmetError> {
        self.fs.write(path, value).map_err(|source| NvmetError {
            op: "write",
            path: path.to_path_buf(),
            source,
        })
    }

    fn link(&self, target: &Path, link: &Path) -> Result<(), NvmetError> {
        if self.exists(link)? {
            return Ok(());
        }
        self.fs.symlink(target, link).map_err(|source| NvmetError {
            op: "symlink",
            path: link.to_path_buf(),
            source,
        })
    }

    fn unlink(&self, link: &Path) -> Result<(), NvmetError> {
        if !self.exists(link)? {
            return Ok(());
        }
        self.fs.unlink(link).map_err(|source| NvmetError {
            op: "unlink",
            path: link.to_path_buf(),
            source,
        })
    }

    fn rmdir(&self, path: &Path) -> Result<(), NvmetError> {
        if !self.exists(path)? {
            return Ok(());
        }
        self.fs.rmdir(path).map_err(|source| NvmetError {
            op: "rmdir",
            path: path.to_path_buf(),
            source,
        })
    }

    /// The TCP port, created once.
    fn ensure_port(&self) -> Result<(), NvmetError> {
        let dir = self.port_dir();
        if self.exists(&dir)? {
            return Ok(());
        }
        self.mkdir(&dir)?;
        self.write(&dir.join("addr_trtype"), "tcp")?;
        self.write(&dir.join("addr_adrfam"), self.port.family)?;
        self.write(&dir.join("addr_traddr"), &self.port.address)?;
        self.write(&dir.join("addr_trsvcid"), &self.port.port.to_string())
    }

    /// Exports `image` as the volume's subsystem (idempotent): no host may connect until
    /// `allow_host`.
    pub fn export(
        &self,
        volume: &VolumeId,
        uuid: &str,
        image: &Path,
        ctrl_loss_tmo: u32,
    ) -> Result<ExportInfo, NvmetError> {
        let sub = self.subsystem(volume);
        self.mkdir(&sub)?;
        self.write(&sub.join("attr_allow_any_host"), "0")?;
        let ns = sub.join("namespaces").join("1");
        self.mkdir(&ns)?;
        // A namespace's backing cannot change while enabled (the kernel answers EBUSY):
        // set it up, then enable, once.
        let enabled = self
            .fs
            .read(&ns.join("enable"))
            .is_ok_and(|v| v.trim() == "1");
        if !enabled {
            self.write(&ns.join("device_path"), &image.display().to_string())?;
            self.write(&ns.join("device_uuid"), uuid)?;
            self.write(&ns.join("enable"), "1")?;
        }
        self.ensure_port()?;
        self.link(&sub, &self.port_link(volume))?;
        Ok(ExportInfo::NvmeTcp {
            address: self.port.address.clone(),
            port: self.port.port,
            subsystem_nqn: self.nqn(volume),
            namespace_uuid: uuid.to_owned(),
            ctrl_loss_tmo,
            host_nqn: None,
        })
    }

    /// Lets `host` (its NQN) connect to the volume.
    pub fn allow_host(&self, volume: &VolumeId, host: &str) -> Result<(), NvmetError> {
        if !component(host) {
            return Err(NvmetError {
                op: "allow",
                path: PathBuf::from(host),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an NQN"),
            });
        }
        let host_dir = self.root.join("hosts").join(host);
        self.mkdir(&host_dir)?;
        self.link(
            &host_dir,
            &self.subsystem(volume).join("allowed_hosts").join(host),
        )
    }

    /// Takes `host`'s permission away; with `evict`, also cuts its live connection:
    /// removing the link alone does not. nvmet has no per-host disconnect, so the
    /// subsystem is unlinked from the port (every controller of it drops) and linked
    /// again: allowed hosts reconnect by themselves, the denied one is refused.
    ///
    /// The permission goes first, so the denied host cannot reconnect in the window a
    /// slow round trip to the storage host opens. With `evict` the port is cycled even
    /// when the permission was already gone: the caller asks only for a node it still
    /// counts as a holder, and a retry after a failure between the two steps must
    /// still drop the live connection.
    pub fn deny_host(&self, volume: &VolumeId, host: &str, evict: bool) -> Result<(), NvmetError> {
        if !component(host) {
            return Ok(());
        }
        let sub = self.subsystem(volume);
        if !self.exists(&sub)? {
            return Ok(()); // not exported: nobody can be connected
        }
        self.unlink(&sub.join("allowed_hosts").join(host))?;
        if evict {
            let link = self.port_link(volume);
            self.unlink(&link)?;
            self.link(&sub, &link)?;
        }
        self.forget_host_if_unused(host);
        Ok(())
    }

    /// Removes `hosts/<host>` once no subsystem allows that host any more: the entry
    /// grants nothing by itself, but one per node ever published would pile up. Best
    /// effort (a host still linked somewhere, or a concurrent allow, keeps it).
    fn forget_host_if_unused(&self, host: &str) {
        let subsystems = self.root.join("subsystems");
        let Ok(names) = self.fs.list(&subsystems) else {
            return;
        };
        let in_use = names.iter().any(|sub| {
            self.fs
                .exists(&subsystems.join(sub).join("allowed_hosts").join(host))
                .unwrap_or(true)
        });
        if !in_use {
            if let Err(e) = self.rmdir(&self.root.join("hosts").join(host)) {
                tracing::debug!(host, error = %e, "host entry kept");
            }
        }
    }

    /// Whether the volume has a subsystem here.
    pub fn is_exported(&self, volume: &VolumeId) -> Result<bool, NvmetError> {
        self.exists(&self.subsystem(volume))
    }

    /// Whether configfs has nvmet at all (the module is loaded).
    pub fn available(&self) -> Result<bool, NvmetError> {
        self.exists(&self.root.join("subsystems"))
    }

    /// Makes connected hosts see a grown image.
    pub fn resize(&self, volume: &VolumeId) -> Result<(), NvmetError> {
        let attr = self
            .subsystem(volume)
            .join("namespaces")
            .join("1")
            .join("revalidate_size");
        self.write(&attr, "1")
    }

    /// Removes the export entirely (idempotent): port link, host links, namespace,
    /// subsystem.
    pub fn unexport(&self, volume: &VolumeId) -> Result<(), NvmetError> {
        let sub = self.subsystem(volume);
        self.unlink(&self.port_link(volume))?;
        let allowed = sub.join("allowed_hosts");
        let hosts = self.fs.list(&allowed).map_err(|source| NvmetError {
            op: "list",
            path: allowed.clone(),
            source,
        })?;
        for host in hosts.iter().filter(|h| component(h)) {
            self.unlink(&allowed.join(host))?;
        }
        let ns = sub.join("namespaces").join("1");
        if self.exists(&ns)? {
            self.write(&ns.join("enable"), "0")?;
        }
        self.rmdir(&ns)?;
        self.rmdir(&sub)?;
        for host in hosts.iter().filter(|h| component(h)) {
            self.forget_host_if_unused(host);
        }
        Ok(())
    }
}

#[cfg(test)]
impl<F: ConfigFs> Nvmet<F> {
    pub(crate) fn fs(&self) -> &F {
        &self.fs
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use parking_lot::Mutex;

    use super::*;

    /// Records every operation and keeps the tree, like configfs would.
    #[derive(Debug, Default)]
    pub(crate) struct FakeConfigFs {
        ops: Mutex<Vec<String>>,
        present: Mutex<BTreeSet<PathBuf>>,
        values: Mutex<std::collections::BTreeMap<PathBuf, String>>,
        /// Every question fails, as over a lost SSH session.
        pub(crate) unreachable: std::sync::atomic::AtomicBool,
    }

    impl FakeConfigFs {
        fn log(&self, op: String) {
            self.ops.lock().push(op);
        }
        pub(crate) fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.ops.lock())
        }
    }

    fn rel(p: &Path) -> String {
        p.strip_prefix("/cfg/nvmet")
            .unwrap_or(p)
            .display()
            .to_string()
    }

    impl ConfigFs for FakeConfigFs {
        fn mkdir(&self, path: &Path) -> std::io::Result<()> {
            self.log(format!("mkdir {}", rel(path)));
            self.present.lock().insert(path.to_path_buf());
            Ok(())
        }
        fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
            self.log(format!("write {}={value}", rel(path)));
            self.values
                .lock()
                .insert(path.to_path_buf(), value.to_owned());
            Ok(())
        }
        fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()> {
            self.log(format!("link {} -> {}", rel(link), rel(target)));
            self.present.lock().insert(link.to_path_buf());
            Ok(())
        }
        fn unlink(&self, link: &Path) -> std::io::Result<()> {
            self.log(format!("unlink {}", rel(link)));
            self.present.lock().remove(link);
            Ok(())
        }
        fn rmdir(&self, path: &Path) -> std::io::Result<()> {
            self.log(format!("rmdir {}", rel(path)));
            self.present.lock().remove(path);
            Ok(())
        }
        fn exists(&self, path: &Path) -> std::io::Result<bool> {
            if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("storage host unreachable"));
            }
            Ok(self.present.lock().contains(path))
        }
        fn read(&self, path: &Path) -> std::io::Result<String> {
            self.values
                .lock()
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
            if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("storage host unreachable"));
            }
            Ok(self
                .present
                .lock()
                .iter()
                .filter(|p| p.parent() == Some(dir))
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect())
        }
    }

    pub(crate) const PREFIX: &str = "nqn.2026-11.dev.handoff-csi:";

    /// A target on the recording fake: configfs at /cfg/nvmet, port 1 on 10.0.0.2:4420.
    pub(crate) fn target() -> Nvmet<FakeConfigFs> {
        Nvmet::new(
            FakeConfigFs::default(),
            PathBuf::from("/cfg/nvmet"),
            PortConfig {
                id: 1,
                address: "10.0.0.2".into(),
                port: 4420,
                family: "ipv4",
            },
            PREFIX,
        )
    }

    #[test]
    fn export_sets_up_in_order_and_is_idempotent() {
        let t = target();
        let v = VolumeId::generate();
        let nqn = format!("{PREFIX}{v}");
        let e = t
            .export(&v, "uuid-1", Path::new("/data/volumes/x.img"), 600)
            .unwrap();
        assert_eq!(
            e,
            ExportInfo::NvmeTcp {
                address: "10.0.0.2".into(),
                port: 4420,
                subsystem_nqn: nqn.clone(),
                namespace_uuid: "uuid-1".into(),
                ctrl_loss_tmo: 600,
                host_nqn: None,
            }
        );
        let sub = format!("subsystems/{nqn}");
        assert_eq!(
            t.fs.take(),
            [
                format!("mkdir {sub}"),
                format!("write {sub}/attr_allow_any_host=0"),
                format!("mkdir {sub}/namespaces/1"),
                format!("write {sub}/namespaces/1/device_path=/data/volumes/x.img"),
                format!("write {sub}/namespaces/1/device_uuid=uuid-1"),
                format!("write {sub}/namespaces/1/enable=1"),
                "mkdir ports/1".into(),
                "write ports/1/addr_trtype=tcp".into(),
                "write ports/1/addr_adrfam=ipv4".into(),
                "write ports/1/addr_traddr=10.0.0.2".into(),
                "write ports/1/addr_trsvcid=4420".into(),
                format!("link ports/1/subsystems/{nqn} -> {sub}"),
            ]
        );
        // Again: no new directories or links (the port is not set up twice).
        t.export(&v, "uuid-1", Path::new("/data/volumes/x.img"), 600)
            .unwrap();
        let again = t.fs.take();
        assert!(
            again
                .iter()
                .all(|op| !op.starts_with("mkdir") && !op.starts_with("link")),
            "{again:?}"
        );
        // An enabled namespace's backing is never rewritten (the kernel says EBUSY).
        assert!(
            again.iter().all(|op| !op.contains("namespaces/1/")),
            "{again:?}"
        );
    }

    #[test]
    fn allow_deny_and_evict() {
        let t = target();
        let v = VolumeId::generate();
        let nqn = format!("{PREFIX}{v}");
        t.export(&v, "u", Path::new("/i"), 600).unwrap();
        t.fs.take();
        let host = "nqn.2014-08.org.nvmexpress:uuid:node-a";
        t.allow_host(&v, host).unwrap();
        assert_eq!(
            t.fs.take(),
            [
                format!("mkdir hosts/{host}"),
                format!("link subsystems/{nqn}/allowed_hosts/{host} -> hosts/{host}"),
            ]
        );
        // Deny without evict only removes the permission.
        t.deny_host(&v, host, false).unwrap();
        // …and the host's entry, which no subsystem allows any more (issue 17: entries
        // piled up one per node ever published).
        assert_eq!(
            t.fs.take(),
            [
                format!("unlink subsystems/{nqn}/allowed_hosts/{host}"),
                format!("rmdir hosts/{host}"),
            ]
        );
        // Deny with evict removes the permission first (the host cannot reconnect while
        // the port cycles), then cycles the port link so the live controller drops.
        t.allow_host(&v, host).unwrap();
        t.fs.take();
        t.deny_host(&v, host, true).unwrap();
        let cycle = [
            format!("unlink ports/1/subsystems/{nqn}"),
            format!("link ports/1/subsystems/{nqn} -> subsystems/{nqn}"),
        ];
        let mut want = vec![format!("unlink subsystems/{nqn}/allowed_hosts/{host}")];
        want.extend(cycle.clone());
        want.push(format!("rmdir hosts/{host}"));
        assert_eq!(t.fs.take(), want);
        // A retry (the permission already gone after a failure mid-way) evicts again.
        t.deny_host(&v, host, true).unwrap();
        assert_eq!(t.fs.take(), cycle);
        // Host names that are not one path component never reach configfs.
        assert!(t.allow_host(&v, "../../etc").is_err());
        assert!(t.allow_host(&v, "").is_err());
        assert!(t.fs.take().is_empty());
    }

    #[test]
    fn an_unreachable_target_is_an_error_never_absent() {
        let t = target();
        let v = VolumeId::generate();
        t.export(&v, "u", Path::new("/i"), 600).unwrap();
        let host = "nqn.2014-08.org.nvmexpress:uuid:node-a";
        t.allow_host(&v, host).unwrap();
        t.fs.unreachable
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            t.deny_host(&v, host, true).is_err(),
            "a fence that could not ask failed"
        );
        assert!(
            t.unexport(&v).is_err(),
            "a delete that could not ask failed"
        );
        assert!(t.is_exported(&v).is_err());
        assert!(t.available().is_err());
    }

    #[test]
    fn resize_and_clean_unexport() {
        let t = target();
        let v = VolumeId::generate();
        let nqn = format!("{PREFIX}{v}");
        t.export(&v, "u", Path::new("/i"), 600).unwrap();
        t.allow_host(&v, "h1").unwrap();
        t.fs.take();
        t.resize(&v).unwrap();
        assert_eq!(
            t.fs.take(),
            [format!(
                "write subsystems/{nqn}/namespaces/1/revalidate_size=1"
            )]
        );
        t.unexport(&v).unwrap();
        assert_eq!(
            t.fs.take(),
            [
                format!("unlink ports/1/subsystems/{nqn}"),
                format!("unlink subsystems/{nqn}/allowed_hosts/h1"),
                format!("write subsystems/{nqn}/namespaces/1/enable=0"),
                format!("rmdir subsystems/{nqn}/namespaces/1"),
                format!("rmdir subsystems/{nqn}"),
                "rmdir hosts/h1".to_owned(),
            ]
        );
        // Unexporting again touches nothing.
        t.unexport(&v).unwrap();
        assert!(t.fs.take().is_empty());
    }
}
