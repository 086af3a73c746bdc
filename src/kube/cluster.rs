//! ClusterView backed by the watch caches of Nodes, VolumeAttachments and (when
//! installed) KubeVirt's VMIs and migrations; pods are listed when a second node asks.

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::ListParams;
use kube::{Api, Client};

use super::cache::ClusterCache;
use super::kubevirt::{foreign_pods, pods_using, KubevirtCache};
use crate::attachment::cluster::{AttachmentObject, ClusterError, ClusterView, NodeKnown};
use crate::attachment::deadline::MigrationClock;
use crate::attachment::state::{MigrationPhase, MigrationRef, Workload};
use crate::capability::Sharing;
use crate::ids::{NodeId, VolumeId};

pub struct KubeCluster {
    cache: Arc<ClusterCache>,
    kubevirt: Arc<KubevirtCache>,
    client: Client,
}

impl KubeCluster {
    pub fn new(cache: Arc<ClusterCache>, kubevirt: Arc<KubevirtCache>, client: Client) -> Self {
        KubeCluster {
            cache,
            kubevirt,
            client,
        }
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

    async fn node_known(&self, node: &NodeId) -> Result<NodeKnown, ClusterError> {
        if !self.cache.nodes_known() {
            return Ok(NodeKnown::CannotTell);
        }
        if self.cache.node_exists(node) {
            return Ok(NodeKnown::Yes);
        }
        Ok(NodeKnown::No(format!(
            "no Node is named {node} and no CSINode lists node id {node} for driver {} (or that Node is out of service); the node id is what NodeGetInfo reported (--node-id; in Kubernetes set it from spec.nodeName)",
            self.cache.driver()
        )))
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
                    created: va.created,
                })
                .collect(),
        ))
    }

    async fn confirmed_attachments(&self) -> Result<Option<Vec<AttachmentObject>>, ClusterError> {
        // A LIST without resourceVersion is served from etcd (a quorum read), whatever
        // state the VolumeAttachment watch is in.
        let list = Api::<VolumeAttachment>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| ClusterError(format!("listing VolumeAttachments: {e}")))?;
        let mut out = Vec::new();
        for va in &list.items {
            let Some(entry) = self.cache.va_entry(va) else {
                continue;
            };
            // Unknown PV name: this object may hold a volume the cache has not seen, so
            // nothing is known to be detached.
            let Some(volume) = self.cache.volume_of(&entry.pv_name) else {
                return Ok(None);
            };
            out.push(AttachmentObject {
                volume,
                node: entry.node,
                attached: entry.attached,
                created: entry.created,
            });
        }
        Ok(Some(out))
    }

    async fn sharing_of(&self, volume: &VolumeId) -> Result<Option<Sharing>, ClusterError> {
        Ok(self.cache.pv_for(volume).map(|pv| pv.sharing))
    }

    async fn workload(
        &self,
        volume: &VolumeId,
        holder: &NodeId,
        target: &NodeId,
        check_pods: bool,
    ) -> Result<Workload, ClusterError> {
        let Some((namespace, claim)) = self.cache.pv_for(volume).and_then(|pv| pv.claim) else {
            // No bound claim known: nothing to match or check (not a pod's volume).
            return Ok(Workload::default());
        };
        let kubevirt = self.kubevirt.present();
        let vmi = kubevirt
            .then(|| self.kubevirt.vmi_using(&namespace, &claim, holder))
            .flatten();
        let mut workload = Workload::default();
        if !kubevirt && !check_pods {
            return Ok(workload);
        }
        // A fresh list, not a cache: the target pod was created moments ago, and it is
        // the only object that ties this attach to a migration (KubeVirt names the
        // target node elsewhere only after this attach made the pod Ready).
        let pods = match Api::<Pod>::namespaced(self.client.clone(), &namespace)
            .list(&ListParams::default())
            .await
        {
            Ok(pods) => pods.items,
            // Checking who uses the claim is a safety rule: no answer, no second node.
            Err(e) if check_pods => {
                return Err(ClusterError(format!(
                    "cannot list pods in namespace {namespace} to check who uses claim {claim}: {e}"
                )))
            }
            // Matching the migration only names it: the reconciler tries again.
            Err(e) => {
                tracing::warn!(namespace = %namespace, error = %e, "pods not listed; the dual attach is matched to its migration later");
                if let Some(vmi) = &vmi {
                    workload.vmi = self.kubevirt.clock(vmi, None);
                }
                return Ok(workload);
            }
        };
        let using = pods_using(&pods, &claim);
        if kubevirt {
            workload.migration =
                self.kubevirt
                    .target_migration(&namespace, vmi.as_ref(), &using, target);
            if let Some(vmi) = &vmi {
                workload.vmi = self
                    .kubevirt
                    .clock(vmi, workload.migration.as_ref().map(|m| m.uid.as_str()));
            }
        }
        if check_pods {
            workload.foreign_pods = foreign_pods(
                &namespace,
                &using,
                vmi.as_ref().map(|v| v.uid.as_str()),
                holder,
            );
        }
        Ok(workload)
    }

    async fn migration_clock(
        &self,
        migration: &MigrationRef,
    ) -> Result<Option<MigrationClock>, ClusterError> {
        Ok(self.kubevirt.clock_of(migration))
    }

    async fn migration_phase(
        &self,
        migration: &MigrationRef,
    ) -> Result<Option<MigrationPhase>, ClusterError> {
        Ok(self.kubevirt.phase(migration))
    }
}
