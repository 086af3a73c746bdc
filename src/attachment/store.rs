//! Durable storage of attachment state. Without Kubernetes: one JSON file per volume in
//! the state dir (a write touches only its volume, so unrelated publishes never contend).

use std::fs;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::state::AttachmentState;
use crate::durable;
use crate::ids::VolumeId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("attachment store {op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attachment store unavailable: {0}")]
    Unavailable(String),
    #[error("{object} changed since it was read (another writer); the decision is re-made on fresh state")]
    Stale { object: String },
    #[error("{object} kept changing under {attempts} attempts; retry")]
    Conflict { object: String, attempts: u32 },
    #[error("attachment record {path:?} is unreadable ({source}); the volume is not published until a person repairs or removes the record (then restart the controller so VolumeAttachments are adopted)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The record would be larger than the store can hold (a PV's annotations are limited
    /// to 256 KiB): the change is refused before the API server refuses it.
    #[error("{0}")]
    TooLarge(String),
    /// One object the driver cannot decide on; the rest of the volumes carry on.
    #[error("volume {volume} is quarantined: {reason}")]
    Quarantined { volume: VolumeId, reason: String },
}

#[async_trait]
pub trait AttachmentStore: Send + Sync + 'static {
    /// Every persisted state, for the rebuild at start-up and listings.
    async fn load_all(&self) -> Result<Vec<AttachmentState>, StoreError>;
    /// The current state of one volume. Every decision starts from this, never from a
    /// copy kept in memory, so a second controller replica never decides on old data.
    async fn load(&self, volume: &VolumeId) -> Result<Option<AttachmentState>, StoreError>;
    /// Persists `state`; returns only once it is durable. `Stale` when the stored
    /// state changed since `state.stored_version` was read.
    async fn save(&self, state: &AttachmentState) -> Result<(), StoreError>;
    /// Forgets the volume's state (no node holds it any more), with the same guard.
    async fn remove(&self, state: &AttachmentState) -> Result<(), StoreError>;
}

#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("attachments");
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(FileStore { dir })
    }

    fn path(&self, volume: &VolumeId) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    crate::blocking::run_blocking(f).await
}

#[async_trait]
impl AttachmentStore for FileStore {
    async fn load_all(&self) -> Result<Vec<AttachmentState>, StoreError> {
        let dir = self.dir.clone();
        blocking(move || {
            let mut states = Vec::new();
            for entry in fs::read_dir(&dir).map_err(io("list", &dir))? {
                let path = entry.map_err(io("list", &dir))?.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue; // temp files of an interrupted write
                }
                let bytes = fs::read(&path).map_err(io("read", &path))?;
                // One unreadable record must not stop the others: it is refused per
                // volume by `load`.
                match serde_json::from_slice(&bytes) {
                    Ok(state) => states.push(state),
                    Err(e) => tracing::error!(path = %path.display(), error = %e,
                        "attachment record is unreadable; its volume is quarantined"),
                }
            }
            Ok(states)
        })
        .await
    }

    async fn load(&self, volume: &VolumeId) -> Result<Option<AttachmentState>, StoreError> {
        let path = self.path(volume);
        blocking(move || {
            let Some(bytes) = durable::read_optional(&path).map_err(io("read", &path))? else {
                return Ok(None);
            };
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source })
        })
        .await
    }

    async fn save(&self, state: &AttachmentState) -> Result<(), StoreError> {
        let path = self.path(&state.volume_id);
        let json = serde_json::to_vec(state).expect("attachment state always serialises");
        blocking(move || durable::write_atomic(&path, &json).map_err(io("write", &path))).await
    }

    async fn remove(&self, state: &AttachmentState) -> Result<(), StoreError> {
        let path = self.path(&state.volume_id);
        blocking(move || durable::remove(&path).map_err(io("remove", &path))).await
    }
}

/// In-memory store: for tests and benchmarks of the rules without disk I/O.
#[derive(Debug, Default)]
pub struct MemoryStore {
    states: parking_lot::Mutex<std::collections::BTreeMap<VolumeId, AttachmentState>>,
}

#[async_trait]
impl AttachmentStore for MemoryStore {
    async fn load_all(&self) -> Result<Vec<AttachmentState>, StoreError> {
        Ok(self.states.lock().values().cloned().collect())
    }

    async fn save(&self, state: &AttachmentState) -> Result<(), StoreError> {
        self.states
            .lock()
            .insert(state.volume_id.clone(), state.clone());
        Ok(())
    }

    async fn load(&self, volume: &VolumeId) -> Result<Option<AttachmentState>, StoreError> {
        Ok(self.states.lock().get(volume).cloned())
    }

    async fn remove(&self, state: &AttachmentState) -> Result<(), StoreError> {
        self.states.lock().remove(&state.volume_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::attachment::state::NodeAttachment;
    use crate::capability::Sharing;
    use crate::ids::NodeId;

    #[tokio::test]
    async fn file_store_round_trips_order_and_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut s = AttachmentState::new(
            VolumeId::generate(),
            Sharing::Rwx,
            crate::attachment::state::DEFAULT_MIGRATION_TIMEOUT,
        );
        for n in ["node-b", "node-a"] {
            s.nodes.push(NodeAttachment {
                node_id: NodeId::parse(n).unwrap(),
                attached_at: Utc::now(),
                readonly: false,
                access: None,
                fencing: false,
            });
        }
        s.migration_started_at = Some(Utc::now());
        store.save(&s).await.unwrap();
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load_all().await.unwrap(), vec![s.clone()]);
        assert_eq!(reopened.load(&s.volume_id).await.unwrap(), Some(s.clone()));
        store.remove(&s).await.unwrap();
        store.remove(&s).await.unwrap();
        assert!(reopened.load_all().await.unwrap().is_empty());
        assert_eq!(reopened.load(&s.volume_id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_corrupt_record_quarantines_its_volume_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let bad = VolumeId::generate();
        fs::write(dir.path().join(format!("attachments/{bad}.json")), b"{").unwrap();
        let good = AttachmentState::new(
            VolumeId::generate(),
            Sharing::Rwo,
            crate::attachment::state::DEFAULT_MIGRATION_TIMEOUT,
        );
        store.save(&good).await.unwrap();
        assert_eq!(store.load_all().await.unwrap(), vec![good]);
        let err = store.load(&bad).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("repairs or removes"), "{err}");
    }
}
