//! The controller's data planes as one `NodeFence`: the NBD target for volumes on the NBD
//! plane, the backend's own host ACLs (nvmet) or bookkeeping (RouterOS) otherwise. An
//! error on the way (the volume's record, the target) is a failed fence, never a success.

use std::sync::Arc;

use async_trait::async_trait;

use crate::attachment::fence::{FenceError, FenceReport, NodeFence};
use crate::backend::{Backend, Fencing};
use crate::ids::{NodeId, VolumeId};
use crate::nbd::NbdPlane;
use crate::params::DataPlane;

pub struct PlaneFence {
    backend: Arc<dyn Backend>,
    nbd: Option<Arc<NbdPlane>>,
}

impl PlaneFence {
    pub fn new(backend: Arc<dyn Backend>, nbd: Option<Arc<NbdPlane>>) -> Self {
        PlaneFence { backend, nbd }
    }
}

#[async_trait]
impl NodeFence for PlaneFence {
    fn is_noop(&self) -> bool {
        self.nbd.is_none() && self.backend.fencing() == Fencing::None
    }

    async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<FenceReport, FenceError> {
        let failed = |reason: String| FenceError {
            volume: volume.clone(),
            node: node.clone(),
            reason,
        };
        if self.is_noop() {
            return Ok(FenceReport::NONE);
        }
        let record = self
            .backend
            .get_volume(volume)
            .await
            .map_err(|e| failed(format!("cannot read the volume's record: {e}")))?;
        // A volume that no longer exists is exported nowhere.
        let Some(record) = record else {
            return Ok(FenceReport::NONE);
        };
        let plane = record.parameters.data_plane;
        match (plane, &self.nbd) {
            (DataPlane::Nbd, Some(nbd)) => {
                let connections = nbd
                    .target
                    .fence(volume, node)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                Ok(FenceReport {
                    method: Fencing::Target,
                    connections: Some(connections),
                })
            }
            (DataPlane::Nbd, None) => Err(failed(
                "the volume is on the NBD plane but this controller serves no NBD target (--nbd-listen)".into(),
            )),
            (DataPlane::File, _) => match self.backend.fencing() {
                Fencing::None => Ok(FenceReport::NONE),
                Fencing::Bookkeeping => Ok(FenceReport {
                    method: Fencing::Bookkeeping,
                    connections: Some(0),
                }),
                Fencing::Target => {
                    self.backend
                        .deny_node(volume, node)
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    // The target drops the export's connections without counting them.
                    Ok(FenceReport {
                        method: Fencing::Target,
                        connections: None,
                    })
                }
            },
        }
    }
}
