//! The `file` backend: each volume is a sparse raw image in the data dir.
//!
//! Layout (all under `--data-dir`, which may be a shared filesystem):
//! - `volumes/<id>.img`  the volume's data
//! - `volumes/<id>.json` its record; its presence is what makes the volume exist
//! - `names/<sha256(name)>` the volume id reserved for a CreateVolume name, created
//!   exclusively, so two controllers (or a retried call after a crash) never create two
//!   volumes for one name. Names are hashed because they are arbitrary Unicode.
//! - `snapshots/<id>.img` and `snapshots/<id>.json`, reserved the same way.

mod copy;
mod snapshots;

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use self::copy::{copy_image, CopyError};
use super::{
    Backend, BackendError, Condition, ContentSource, CreateSnapshot, CreateVolume, Fencing,
    SnapshotRecord, VolumeRecord, MIB,
};
use crate::durable;
use crate::export::ExportInfo;
use crate::ids::{NodeId, SnapshotId, VolumeId};
use crate::params::DataPlane;

#[derive(Debug, Clone)]
pub struct FileBackend {
    inner: Arc<Layout>,
}

/// Paths of the data dir; every volume path is derived from a validated `VolumeId`.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    volumes: PathBuf,
    names: PathBuf,
    snapshots: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_path_buf(),
            volumes: root.join("volumes"),
            names: root.join("names"),
            snapshots: root.join("snapshots"),
        }
    }

    pub fn volumes_dir(&self) -> &Path {
        &self.volumes
    }

    pub fn image(&self, id: &VolumeId) -> PathBuf {
        self.volumes.join(format!("{id}.img"))
    }

    fn record(&self, id: &VolumeId) -> PathBuf {
        self.volumes.join(format!("{id}.json"))
    }

    fn snapshot_image(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots.join(format!("{id}.img"))
    }

    fn snapshot_record(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots.join(format!("{id}.json"))
    }

    fn name_key(&self, name: &str) -> PathBuf {
        let digest = Sha256::digest(name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.names.join(hex)
    }

    /// The volume id of an image path, if the path is exactly an image of this layout.
    /// Used by the node to refuse publish_context paths that point anywhere else.
    pub fn volume_of_image(&self, path: &Path) -> Option<VolumeId> {
        if path.parent()? != self.volumes {
            return None;
        }
        let stem = path.file_name()?.to_str()?.strip_suffix(".img")?;
        let id = VolumeId::parse(stem).ok()?;
        (self.image(&id) == path).then_some(id)
    }
}

pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |source| BackendError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl FileBackend {
    /// Opens (creating if needed) the data dir.
    pub fn open(root: &Path) -> Result<Self, BackendError> {
        let layout = Layout::new(root);
        for dir in [&layout.volumes, &layout.names, &layout.snapshots] {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        // Image paths go to nodes in publish_context and are compared with what sysfs
        // reports, which is always the resolved path: resolve symlinks once, here.
        let root = fs::canonicalize(root).map_err(io_err("resolve", root))?;
        Ok(FileBackend {
            inner: Arc::new(Layout::new(&root)),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.inner
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&Layout) -> Result<T, BackendError> + Send + 'static,
    {
        let layout = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&layout))
            .await
            .unwrap_or_else(|join| {
                Err(BackendError::Unhealthy {
                    path: PathBuf::new(),
                    reason: format!("backend task failed: {join}"),
                })
            })
    }
}

pub(super) fn load_record(
    layout: &Layout,
    id: &VolumeId,
) -> Result<Option<VolumeRecord>, BackendError> {
    let path = layout.record(id);
    let Some(bytes) = durable::read_optional(&path).map_err(io_err("read", &path))? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| BackendError::CorruptRecord { path, source })
}

/// Reserves `key` for a new id, or returns the id already reserved there (idempotency
/// by name across retries, crashes and concurrent controllers).
pub(super) fn reserve<T>(
    key: &Path,
    generate: impl Fn() -> T,
    parse: impl Fn(&str) -> Option<T>,
    as_str: impl Fn(&T) -> &str,
) -> Result<T, BackendError> {
    loop {
        if let Some(bytes) = durable::read_optional(key).map_err(io_err("read", key))? {
            let raw = String::from_utf8_lossy(&bytes);
            return parse(raw.trim()).ok_or_else(|| BackendError::Unhealthy {
                path: key.to_path_buf(),
                reason: "name reservation holds an invalid id".into(),
            });
        }
        let id = generate();
        if durable::create_exclusive(key, as_str(&id).as_bytes())
            .map_err(io_err("reserve name", key))?
        {
            return Ok(id);
        }
        // Another writer reserved the name between our read and create: use theirs.
    }
}

fn size_error<'a>(
    id: &'a VolumeId,
    image: &'a Path,
    requested: u64,
) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |e| match e.raw_os_error() {
        Some(libc::EFBIG) | Some(libc::EINVAL) => BackendError::TooLarge { requested },
        Some(libc::ENOSPC) => BackendError::NoSpace(id.clone()),
        _ => io_err("size image", image)(e),
    }
}

/// The image and size a new volume copies from.
fn source_of(layout: &Layout, source: &ContentSource) -> Result<(PathBuf, u64), BackendError> {
    match source {
        ContentSource::Snapshot(snap) => {
            let record = snapshots::load(layout, snap)?
                .ok_or_else(|| BackendError::SnapshotNotFound(snap.clone()))?;
            Ok((layout.snapshot_image(snap), record.size_bytes))
        }
        ContentSource::Volume(vol) => {
            let record =
                load_record(layout, vol)?.ok_or_else(|| BackendError::NotFound(vol.clone()))?;
            Ok((layout.image(vol), record.capacity_bytes))
        }
    }
}

fn create_blocking(layout: &Layout, req: &CreateVolume) -> Result<VolumeRecord, BackendError> {
    let key = layout.name_key(req.name.as_str());
    let id = reserve(
        &key,
        VolumeId::generate,
        |s| VolumeId::parse(s).ok(),
        |id| id.as_str(),
    )?;
    if let Some(existing) = load_record(layout, &id)? {
        return existing.reuse_for(req);
    }

    // Reserved but not yet complete (fresh, or a crash mid-create): finish it.
    let image = layout.image(&id);
    let capacity = match &req.source {
        None => {
            let capacity = req.capacity.resolve()?;
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&image)
                .map_err(io_err("create image", &image))?;
            file.set_len(capacity)
                .map_err(size_error(&id, &image, capacity))?;
            file.sync_all().map_err(io_err("sync image", &image))?;
            capacity
        }
        Some(source) => {
            let (src, source_size) = source_of(layout, source)?;
            let wanted = if req.capacity.required == 0 && req.capacity.limit == 0 {
                source_size
            } else {
                req.capacity.resolve()?.max(source_size)
            };
            if req.capacity.limit != 0 && wanted > req.capacity.limit {
                return Err(BackendError::SmallerThanSource {
                    requested: req.capacity.limit,
                    source_size,
                });
            }
            let capacity = wanted.next_multiple_of(MIB);
            // A partial copy from an interrupted attempt is redone from scratch.
            durable::remove(&image).map_err(io_err("remove partial image", &image))?;
            let atomic = req.source_in_use && matches!(source, ContentSource::Volume(_));
            copy_image(&src, &image, atomic).map_err(|e| match e {
                CopyError::NotAtomic => BackendError::NotAtomic(match source {
                    ContentSource::Volume(v) => v.clone(),
                    ContentSource::Snapshot(_) => id.clone(),
                }),
                CopyError::Io(e) => io_err("copy image", &image)(e),
            })?;
            if capacity > source_size {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .map_err(io_err("open image", &image))?;
                file.set_len(capacity)
                    .map_err(size_error(&id, &image, capacity))?;
                file.sync_all().map_err(io_err("sync image", &image))?;
            }
            capacity
        }
    };

    let record = VolumeRecord {
        id: id.clone(),
        name: req.name.to_string(),
        capacity_bytes: capacity,
        capabilities: req.capabilities.clone(),
        parameters: req.parameters.clone(),
        created_at: chrono::Utc::now(),
        source: req.source.clone(),
    };
    write_record(layout, &record)?;
    Ok(record)
}

fn write_record(layout: &Layout, record: &VolumeRecord) -> Result<(), BackendError> {
    let path = layout.record(&record.id);
    let json = serde_json::to_vec_pretty(record).expect("volume records always serialise");
    durable::write_atomic(&path, &json).map_err(io_err("write record", &path))
}

/// Ids of the `<id>.json` records in `dir` (temp files and foreign names skipped).
pub(super) fn record_ids<T>(
    dir: &Path,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, BackendError> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let path = entry.map_err(io_err("list", dir))?.path();
        if let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(&parse)
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Releases a name reservation if it still points at `id`: done first on delete, so a
/// crash afterwards leaves the record for a retried delete to find.
pub(super) fn release_name(key: &Path, id: &str) -> Result<(), BackendError> {
    let reserved = durable::read_optional(key).map_err(io_err("read", key))?;
    if reserved
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).trim().to_owned())
        == Some(id.to_owned())
    {
        durable::remove(key).map_err(io_err("remove", key))?;
    }
    Ok(())
}

fn list_blocking(layout: &Layout) -> Result<Vec<VolumeRecord>, BackendError> {
    let mut out = Vec::new();
    for id in record_ids(&layout.volumes, |n| VolumeId::parse(n).ok())? {
        out.extend(load_record(layout, &id)?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn expand_blocking(
    layout: &Layout,
    id: &VolumeId,
    size: u64,
) -> Result<VolumeRecord, BackendError> {
    let mut record = load_record(layout, id)?.ok_or_else(|| BackendError::NotFound(id.clone()))?;
    if size < record.capacity_bytes {
        return Err(BackendError::Shrink {
            volume: id.clone(),
            current: record.capacity_bytes,
            requested: size,
        });
    }
    let image = layout.image(id);
    let file = OpenOptions::new()
        .write(true)
        .open(&image)
        .map_err(io_err("open image", &image))?;
    // Also on equal size: a retry after a crash between set_len and the record write.
    if file.metadata().map_err(io_err("stat image", &image))?.len() < size {
        file.set_len(size).map_err(size_error(id, &image, size))?;
        file.sync_all().map_err(io_err("sync image", &image))?;
    }
    if record.capacity_bytes != size {
        record.capacity_bytes = size;
        write_record(layout, &record)?;
    }
    Ok(record)
}

fn condition_blocking(layout: &Layout, record: &VolumeRecord) -> Result<Condition, BackendError> {
    let image = layout.image(&record.id);
    Ok(match std::fs::metadata(&image) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Condition {
            abnormal: true,
            message: format!("image {} is missing from the data dir", image.display()),
        },
        Err(e) => Condition {
            abnormal: true,
            message: format!("image {} cannot be read: {e}", image.display()),
        },
        Ok(m) if m.len() < record.capacity_bytes => Condition {
            abnormal: true,
            message: format!(
                "image has {} bytes, {} expected",
                m.len(),
                record.capacity_bytes
            ),
        },
        Ok(_) => Condition {
            abnormal: false,
            message: "image present with its full size".into(),
        },
    })
}

fn capacity_blocking(layout: &Layout) -> Result<u64, BackendError> {
    let st = nix::sys::statvfs::statvfs(&layout.volumes).map_err(|e| BackendError::Unhealthy {
        path: layout.volumes.clone(),
        reason: format!("statvfs failed: {e}"),
    })?;
    Ok(st.blocks_available() * st.fragment_size())
}

fn delete_blocking(layout: &Layout, id: &VolumeId) -> Result<(), BackendError> {
    if let Some(record) = load_record(layout, id)? {
        release_name(&layout.name_key(&record.name), id.as_str())?;
    }
    let image = layout.image(id);
    durable::remove(&image).map_err(io_err("remove", &image))?;
    let record = layout.record(id);
    durable::remove(&record).map_err(io_err("remove", &record))
}

fn probe_blocking(layout: &Layout) -> Result<(), BackendError> {
    let unhealthy = |reason: String| BackendError::Unhealthy {
        path: layout.root.clone(),
        reason,
    };
    nix::unistd::access(&layout.volumes, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| unhealthy(format!("volumes directory is not writable: {e}")))?;
    nix::sys::statvfs::statvfs(&layout.volumes)
        .map_err(|e| unhealthy(format!("statvfs failed: {e}")))?;
    Ok(())
}

#[async_trait]
impl Backend for FileBackend {
    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeRecord, BackendError> {
        let req = req.clone();
        self.blocking(move |l| create_blocking(l, &req)).await
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<(), BackendError> {
        let id = id.clone();
        self.blocking(move |l| delete_blocking(l, &id)).await
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, BackendError> {
        let id = id.clone();
        self.blocking(move |l| load_record(l, &id)).await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, BackendError> {
        self.blocking(list_blocking).await
    }

    async fn expand_volume(&self, id: &VolumeId, size: u64) -> Result<VolumeRecord, BackendError> {
        let id = id.clone();
        self.blocking(move |l| expand_blocking(l, &id, size)).await
    }

    async fn condition(&self, volume: &VolumeRecord) -> Result<Condition, BackendError> {
        let volume = volume.clone();
        self.blocking(move |l| condition_blocking(l, &volume)).await
    }

    async fn available_capacity(&self) -> Result<u64, BackendError> {
        self.blocking(capacity_blocking).await
    }

    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotRecord, BackendError> {
        let req = req.clone();
        self.blocking(move |l| snapshots::create(l, &req)).await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
        let id = id.clone();
        self.blocking(move |l| snapshots::delete(l, &id)).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, BackendError> {
        self.blocking(snapshots::list).await
    }

    async fn export(
        &self,
        volume: &VolumeRecord,
        _node: &NodeId,
    ) -> Result<ExportInfo, BackendError> {
        // The image itself, also for NBD-plane volumes: it is what their target serves
        // (ControllerPublish of those goes through the plane, see `serves`).
        Ok(ExportInfo::LocalFile {
            path: self.inner.image(&volume.id),
        })
    }

    /// An NBD-plane volume under a controller without its target (the plane wraps this
    /// backend when it runs) must still be fenced there: it cannot be from here, and a
    /// fence that cannot be done is a failed one.
    fn fencing_of(&self, volume: &VolumeRecord) -> Fencing {
        match volume.parameters.data_plane {
            DataPlane::File => Fencing::None,
            DataPlane::Nbd => Fencing::Target,
        }
    }

    async fn deny_node(&self, volume: &VolumeId, _node: &NodeId) -> Result<(), BackendError> {
        Err(BackendError::PlaneNotServed(volume.clone()))
    }

    async fn probe(&self) -> Result<(), BackendError> {
        self.blocking(probe_blocking).await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::backend::{CapacityRange, StoredCapability, MIB};
    use crate::capability::AccessMode;
    use crate::ids::VolumeName;

    fn request(name: &str, required: u64) -> CreateVolume {
        CreateVolume {
            name: VolumeName::parse(name).unwrap(),
            capacity: CapacityRange { required, limit: 0 },
            capabilities: vec![StoredCapability {
                mode: AccessMode::SingleNodeWriter,
                block: true,
            }],
            parameters: Default::default(),
            source: None,
            source_in_use: false,
        }
    }

    #[tokio::test]
    async fn create_is_sparse_and_idempotent_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(dir.path()).unwrap();
        let v1 = b
            .create_volume(&request("pvc-a", 64 * MIB + 1))
            .await
            .unwrap();
        assert_eq!(v1.capacity_bytes, 65 * MIB);
        let meta = fs::metadata(b.layout().image(&v1.id)).unwrap();
        assert_eq!(meta.len(), 65 * MIB);
        assert!(meta.blocks() * 512 < MIB, "image must be sparse");
        let again = b.create_volume(&request("pvc-a", 64 * MIB)).await.unwrap();
        assert_eq!(again, v1);
        let err = b
            .create_volume(&request("pvc-a", 128 * MIB))
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::NameConflict { .. }), "{err}");
        let other = b.create_volume(&request("pvc-b", MIB)).await.unwrap();
        assert_ne!(other.id, v1.id);
    }

    #[tokio::test]
    async fn concurrent_creates_of_one_name_yield_one_volume() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(dir.path()).unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.create_volume(&request("same", MIB)).await })
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().unwrap().id);
        }
        assert_eq!(ids.len(), 1);
        let images = fs::read_dir(dir.path().join("volumes"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("img".as_ref()))
            .count();
        assert_eq!(images, 1);
    }

    #[tokio::test]
    async fn delete_is_idempotent_and_frees_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(dir.path()).unwrap();
        let v = b.create_volume(&request("pvc", MIB)).await.unwrap();
        b.delete_volume(&v.id).await.unwrap();
        b.delete_volume(&v.id).await.unwrap();
        assert!(b.get_volume(&v.id).await.unwrap().is_none());
        assert!(!b.layout().image(&v.id).exists());
        let v2 = b.create_volume(&request("pvc", MIB)).await.unwrap();
        assert_ne!(v2.id, v.id);
    }

    #[tokio::test]
    async fn interrupted_create_is_completed_by_retry() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(dir.path()).unwrap();
        let v = b.create_volume(&request("pvc", MIB)).await.unwrap();
        // Simulate a crash after the name was reserved, before the record was written.
        fs::remove_file(b.layout().record(&v.id)).unwrap();
        assert!(b.get_volume(&v.id).await.unwrap().is_none());
        let again = b.create_volume(&request("pvc", 2 * MIB)).await.unwrap();
        assert_eq!(again.id, v.id);
        assert_eq!(again.capacity_bytes, 2 * MIB);
    }

    #[tokio::test]
    async fn image_paths_are_resolved_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let b = FileBackend::open(&dir.path().join("link")).unwrap();
        let v = b.create_volume(&request("sym", MIB)).await.unwrap();
        let ExportInfo::LocalFile { path } =
            b.export(&v, &NodeId::parse("n").unwrap()).await.unwrap()
        else {
            panic!("the file backend exports local files");
        };
        assert!(
            path.starts_with(fs::canonicalize(&real).unwrap()),
            "{path:?}"
        );
    }

    #[test]
    fn image_paths_are_recognised_exactly() {
        let l = Layout::new(Path::new("/data"));
        let id = VolumeId::generate();
        assert_eq!(l.volume_of_image(&l.image(&id)), Some(id.clone()));
        assert_eq!(l.volume_of_image(Path::new("/etc/passwd")), None);
        let sneaky = PathBuf::from(format!("/data/volumes/../volumes/{id}.img"));
        assert_eq!(l.volume_of_image(&sneaky), None);
        assert_eq!(l.volume_of_image(Path::new("/data/volumes/some.img")), None);
    }

    #[tokio::test]
    async fn probe_checks_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(dir.path()).unwrap();
        b.probe().await.unwrap();
        fs::remove_dir_all(dir.path().join("volumes")).unwrap();
        assert!(b.probe().await.is_err());
    }
}
