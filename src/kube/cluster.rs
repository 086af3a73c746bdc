//! ClusterView backed by the watch caches of Nodes and VolumeAttachments.

use std::sync::Arc;

use async_trait::async_trait;

use super::cache::ClusterCache;
use crate::attachment::cluster::{AttachmentObject, ClusterError, ClusterView};
use crate::ids::NodeId;

pub struct KubeCluster {
    cache: Arc<ClusterCache>,
}

impl KubeCluster {
    pub fn new(cache: Arc<ClusterCache>) -> Self {
        KubeCluster { cache }
    }
}

#[async_trait]
impl ClusterView for KubeCluster {
    async fn gone_nodes(&self, nodes: &[NodeId]) -> Result<Vec<NodeId>, ClusterError> {
        // Until the Node list has been seen once, no node is declared gone.
        if !self.cache.nodes_known() {
            return Ok(Vec::new());
        }
        Ok(nodes
            .iter()
            .filter(|n| !self.cache.node_exists(n))
            .cloned()
            .collect())
    }

    async fn attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        if !self.cache.attachments_known() {
            return Ok(None);
        }
        Ok(Some(
            self.cache
                .attachments()
                .into_iter()
                .map(|(volume, va)| AttachmentObject {
                    volume,
                    node: va.node,
                    attached: va.attached,
                })
                .collect(),
        ))
    }
}
