//! The AttachmentManager: which nodes may hold a volume, decided under a per-volume
//! lock, persisted before the caller is told, and rebuilt from the store at start-up.

pub mod state;
pub mod store;

use std::sync::Arc;

use dashmap::DashMap;
use tracing::{info, warn};

use self::state::{
    decide_publish, decide_unpublish, AttachmentState, PublishDecision, PublishRefusal,
    PublishRequest, UnpublishDecision,
};
use self::store::{AttachmentStore, StoreError};
use crate::capability::Sharing;
use crate::ids::{NodeId, VolumeId};
use crate::locks::{Busy, OperationGuard, OperationLocks};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Refused(#[from] PublishRefusal),
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("attachment state could not be persisted, nothing was changed: {0}")]
    Store(#[from] StoreError),
}

/// What a successful publish did, for events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    AlreadyAttached,
    Attached,
    MigrationStarted,
}

pub struct AttachmentManager {
    store: Arc<dyn AttachmentStore>,
    locks: OperationLocks,
    states: DashMap<VolumeId, AttachmentState>,
}

fn volume_key(id: &VolumeId) -> String {
    format!("volume {id}")
}

impl AttachmentManager {
    /// Rebuilds the in-memory state from the store; call before serving Controller RPCs.
    pub async fn load(store: Arc<dyn AttachmentStore>) -> Result<Self, StoreError> {
        let states = DashMap::new();
        for s in store.load_all().await? {
            states.insert(s.volume_id.clone(), s);
        }
        info!(volumes = states.len(), "attachment state rebuilt");
        Ok(AttachmentManager {
            store,
            locks: OperationLocks::new(),
            states,
        })
    }

    /// Serialises any operation on the volume (publish, unpublish, delete).
    pub fn lock_volume(&self, id: &VolumeId) -> Result<OperationGuard, Busy> {
        self.locks.try_lock(volume_key(id))
    }

    pub fn attached_nodes(&self, id: &VolumeId) -> Vec<NodeId> {
        self.states
            .get(id)
            .map(|s| s.node_ids().cloned().collect())
            .unwrap_or_default()
    }

    pub fn state(&self, id: &VolumeId) -> Option<AttachmentState> {
        self.states.get(id).map(|s| s.clone())
    }

    pub async fn publish(
        &self,
        volume: &VolumeId,
        sharing: Sharing,
        req: PublishRequest,
    ) -> Result<PublishOutcome, AttachError> {
        let _guard = self.lock_volume(volume)?;
        let current = self
            .state(volume)
            .unwrap_or_else(|| AttachmentState::new(volume.clone(), sharing));
        let (next, outcome) = match decide_publish(&current, &req, chrono::Utc::now())? {
            PublishDecision::AlreadyAttached => return Ok(PublishOutcome::AlreadyAttached),
            PublishDecision::Attached(next) => (next, PublishOutcome::Attached),
            PublishDecision::MigrationStarted(next) => (next, PublishOutcome::MigrationStarted),
        };
        // Durable before OK: the cache changes only after the store accepted the state.
        self.store.save(&next).await?;
        self.states.insert(volume.clone(), next);
        match outcome {
            PublishOutcome::MigrationStarted => {
                info!(volume_id = %volume, node_id = %req.node_id, "live migration started: second node attached")
            }
            _ => info!(volume_id = %volume, node_id = %req.node_id, "volume attached"),
        }
        Ok(outcome)
    }

    pub async fn unpublish(&self, volume: &VolumeId, node: &NodeId) -> Result<(), AttachError> {
        let _guard = self.lock_volume(volume)?;
        let Some(current) = self.state(volume) else {
            return Ok(());
        };
        let next = match decide_unpublish(&current, node) {
            UnpublishDecision::NotAttached => return Ok(()),
            UnpublishDecision::Detached(next) => next,
            UnpublishDecision::MigrationCompleted(next) => {
                info!(volume_id = %volume, source = %node, "live migration completed: source detached");
                next
            }
            UnpublishDecision::MigrationAborted(next) => {
                warn!(volume_id = %volume, target = %node, "live migration aborted: target detached first");
                next
            }
        };
        if next.nodes.is_empty() {
            self.store.remove(volume).await?;
            self.states.remove(volume);
        } else {
            self.store.save(&next).await?;
            self.states.insert(volume.clone(), next);
        }
        info!(volume_id = %volume, node_id = %node, "volume detached");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::store::FileStore;

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn req(n: &str) -> PublishRequest {
        PublishRequest {
            node_id: node(n),
            readonly: false,
        }
    }

    #[tokio::test]
    async fn state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let m = AttachmentManager::load(store.clone()).await.unwrap();
        let v = VolumeId::generate();
        m.publish(&v, Sharing::Rwx, req("a")).await.unwrap();
        assert_eq!(
            m.publish(&v, Sharing::Rwx, req("b")).await.unwrap(),
            PublishOutcome::MigrationStarted
        );
        let before = m.state(&v).unwrap();
        drop(m);
        let m = AttachmentManager::load(Arc::new(FileStore::open(dir.path()).unwrap()))
            .await
            .unwrap();
        assert_eq!(m.state(&v).unwrap(), before);
        m.unpublish(&v, &node("a")).await.unwrap();
        m.unpublish(&v, &node("b")).await.unwrap();
        assert!(m.state(&v).is_none());
        assert!(store.load_all().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn racing_rwo_publishes_have_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(
            AttachmentManager::load(Arc::new(FileStore::open(dir.path()).unwrap()))
                .await
                .unwrap(),
        );
        let v = VolumeId::generate();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (m, v) = (m.clone(), v.clone());
                tokio::spawn(
                    async move { m.publish(&v, Sharing::Rwo, req(&format!("n{i}"))).await },
                )
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => wins += 1,
                Err(AttachError::Busy(_)) | Err(AttachError::Refused(_)) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(m.attached_nodes(&v).len(), 1);
    }
}
