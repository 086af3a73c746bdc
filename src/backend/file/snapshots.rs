//! Snapshots of the file backend: an image copy (reflink where possible) plus a record,
//! reserved by name exactly like volumes.

use super::copy::{copy_image, CopyError};
use super::{io_err, load_record, record_ids, release_name, reserve, Layout};
use crate::backend::{BackendError, CreateSnapshot, SnapshotRecord};
use crate::durable;
use crate::ids::SnapshotId;

fn name_key(layout: &Layout, name: &str) -> std::path::PathBuf {
    // A separate namespace from volume names: the same string may name both.
    layout.name_key(&format!("snapshot\\0{name}"))
}

pub(super) fn load(
    layout: &Layout,
    id: &SnapshotId,
) -> Result<Option<SnapshotRecord>, BackendError> {
    let path = layout.snapshot_record(id);
    let Some(bytes) = durable::read_optional(&path).map_err(io_err("read", &path))? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| BackendError::CorruptRecord { path, source })
}

pub(super) fn create(
    layout: &Layout,
    req: &CreateSnapshot,
) -> Result<SnapshotRecord, BackendError> {
    let source = load_record(layout, &req.source)?
        .ok_or_else(|| BackendError::NotFound(req.source.clone()))?;
    let key = name_key(layout, req.name.as_str());
    let id = reserve(
        &key,
        SnapshotId::generate,
        |s| SnapshotId::parse(s).ok(),
        |id| id.as_str(),
    )?;
    if let Some(existing) = load(layout, &id)? {
        return existing.reuse_for(req);
    }
    let image = layout.snapshot_image(&id);
    durable::remove(&image).map_err(io_err("remove partial snapshot", &image))?;
    copy_image(&layout.image(&req.source), &image, req.source_in_use).map_err(|e| match e {
        CopyError::NotAtomic => BackendError::NotAtomic(req.source.clone()),
        CopyError::Io(e) => io_err("copy image", &image)(e),
    })?;
    let record = SnapshotRecord {
        id: id.clone(),
        name: req.name.to_string(),
        source_volume: req.source.clone(),
        size_bytes: source.capacity_bytes,
        created_at: chrono::Utc::now(),
    };
    let path = layout.snapshot_record(&id);
    let json = serde_json::to_vec_pretty(&record).expect("snapshot records always serialise");
    durable::write_atomic(&path, &json).map_err(io_err("write snapshot record", &path))?;
    Ok(record)
}

pub(super) fn delete(layout: &Layout, id: &SnapshotId) -> Result<(), BackendError> {
    if let Some(record) = load(layout, id)? {
        release_name(&name_key(layout, &record.name), id.as_str())?;
    }
    let image = layout.snapshot_image(id);
    durable::remove(&image).map_err(io_err("remove", &image))?;
    let record = layout.snapshot_record(id);
    durable::remove(&record).map_err(io_err("remove", &record))
}

pub(super) fn list(layout: &Layout) -> Result<Vec<SnapshotRecord>, BackendError> {
    let mut out = Vec::new();
    for id in record_ids(&layout.snapshots, |n| SnapshotId::parse(n).ok())? {
        out.extend(load(layout, &id)?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}
