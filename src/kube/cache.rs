//! Watch caches of the objects the controller reads: this driver's PersistentVolumes
//! (indexed both ways between volume id and PV name), Nodes and VolumeAttachments.
//! Reads never go to the API server; writes (PV annotation patches) feed their result
//! back so the next guarded patch uses the newest resourceVersion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;

use crate::capability::Sharing;
use crate::ids::{NodeId, VolumeId};

/// What the controller needs to know about one of its PVs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvEntry {
    pub name: String,
    pub volume_id: VolumeId,
    pub resource_version: String,
    pub attachment: Option<String>,
    /// namespace/name of the bound claim, for Events on the PVC.
    pub claim: Option<(String, String)>,
    /// The PV's and its claim's uids: `kubectl describe` lists Events by involvedObject.uid.
    pub uid: Option<String>,
    pub claim_uid: Option<String>,
    /// Bytes of the PV's annotations other than the driver's own: they share the API
    /// server's 256 KiB budget with the attachment record.
    pub other_annotation_bytes: usize,
    /// What the PV's access modes and volume mode allow.
    pub sharing: Sharing,
}

/// ReadWriteMany raw block → two nodes (live migration); read-only only → any number
/// read-only; anything else → one node. The same mapping CreateVolume's capabilities get.
fn sharing_of(pv: &PersistentVolume) -> Sharing {
    let spec = pv.spec.as_ref();
    let modes: Vec<&str> = spec
        .and_then(|s| s.access_modes.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let block = spec.and_then(|s| s.volume_mode.as_deref()) == Some("Block");
    if modes.contains(&"ReadWriteMany") && block {
        Sharing::Rwx
    } else if !modes.is_empty() && modes.iter().all(|m| *m == "ReadOnlyMany") {
        Sharing::Rox
    } else {
        Sharing::Rwo
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaEntry {
    pub pv_name: String,
    pub node: NodeId,
    pub attached: bool,
    pub created: Option<chrono::DateTime<chrono::Utc>>,
}

/// Kubernetes' timestamp as chrono's.
pub fn to_chrono(
    t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
}

/// Whether `candidate` may replace `current` in a cache: never an older version of the
/// same object. resourceVersions are compared only when both are numbers (etcd's
/// revisions); anything else is taken as newer, as the watch delivers in order.
fn not_older(current: &str, candidate: &str) -> bool {
    match (current.parse::<u64>(), candidate.parse::<u64>()) {
        (Ok(c), Ok(n)) => n >= c,
        _ => true,
    }
}

/// Annotation external-attacher puts on a VolumeAttachment: the CSI node id it uses.
pub const VA_NODE_ID: &str = "csi.alpha.kubernetes.io/node-id";

#[derive(Default)]
struct Ready {
    pvs: AtomicBool,
    nodes: AtomicBool,
    vas: AtomicBool,
}

pub struct ClusterCache {
    driver: String,
    pvs: DashMap<String, PvEntry>,
    /// volumeHandle → PV names; more than one is a misconfiguration the driver refuses
    /// to decide on.
    handles: DashMap<VolumeId, std::collections::BTreeSet<String>>,
    /// Node name → out of service (tainted `node.kubernetes.io/out-of-service`).
    nodes: DashMap<String, bool>,
    /// CSINode name (= Node name) → the node id this driver reported there
    /// (`drivers[].nodeID`, from NodeGetInfo): how node ids resolve to Nodes.
    csinodes: DashMap<String, String>,
    vas: DashMap<String, VaEntry>,
    ready: Ready,
    changed: Notify,
}

/// A node the administrator declared dead: Kubernetes force-detaches its volumes, and so
/// do we.
fn out_of_service(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| {
            t.iter()
                .any(|t| t.key == "node.kubernetes.io/out-of-service")
        })
}

impl ClusterCache {
    pub fn driver(&self) -> &str {
        &self.driver
    }

    pub fn new(driver: &str) -> Arc<Self> {
        Arc::new(ClusterCache {
            driver: driver.to_owned(),
            pvs: DashMap::new(),
            handles: DashMap::new(),
            nodes: DashMap::new(),
            csinodes: DashMap::new(),
            vas: DashMap::new(),
            ready: Ready::default(),
            changed: Notify::new(),
        })
    }

    /// Starts the watches; they reconnect with backoff for as long as the process runs.
    pub fn spawn_watches(self: &Arc<Self>, client: Client) {
        Self::watch(
            Api::<PersistentVolume>::all(client.clone()),
            "PersistentVolume",
            {
                let cache = self.clone();
                move |e, p| cache.on_pv_event(e, p)
            },
        );
        Self::watch(Api::<Node>::all(client.clone()), "Node", {
            let cache = self.clone();
            move |e, p| cache.on_node_event(e, p)
        });
        // Until it lists, node ids resolve to Node names by equality.
        Self::watch(Api::<CSINode>::all(client.clone()), "CSINode", {
            let cache = self.clone();
            move |e, p| cache.on_csinode_event(e, p)
        });
        Self::watch(Api::<VolumeAttachment>::all(client), "VolumeAttachment", {
            let cache = self.clone();
            move |e, p| cache.on_va_event(e, p)
        });
    }

    /// One watch of `kind`, each event handed to `on` with the relist buffer it keeps.
    fn watch<K, V, F>(api: Api<K>, kind: &'static str, mut on: F)
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
        K::DynamicType: Default,
        V: Send + 'static,
        F: FnMut(Event<K>, &mut HashMap<String, V>) + Send + 'static,
    {
        tokio::spawn(async move {
            let mut pending = HashMap::new();
            let mut stream = watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(e) => on(e, &mut pending),
                    Err(e) => tracing::warn!(error = %e, kind, "watch interrupted; retrying"),
                }
            }
        });
    }

    fn watch_event<K, V>(
        event: Event<K>,
        pending: &mut HashMap<String, V>,
        convert: impl Fn(&K) -> Option<V>,
        name: impl Fn(&K) -> String,
        apply: impl Fn(String, Option<V>),
        replace_all: impl FnOnce(HashMap<String, V>),
    ) -> bool {
        match event {
            Event::Apply(obj) => apply(name(&obj), convert(&obj)),
            Event::Delete(obj) => apply(name(&obj), None),
            Event::Init => pending.clear(),
            Event::InitApply(obj) => {
                if let Some(v) = convert(&obj) {
                    pending.insert(name(&obj), v);
                }
            }
            // A full relist: objects deleted while the watch was down disappear here.
            Event::InitDone => {
                replace_all(std::mem::take(pending));
                return true;
            }
        }
        false
    }

    fn on_pv_event(&self, event: Event<PersistentVolume>, pending: &mut HashMap<String, PvEntry>) {
        let synced = Self::watch_event(
            event,
            pending,
            |pv| self.pv_entry(pv),
            |pv| pv.name_any(),
            |name, entry| match entry {
                // Never move backwards (our own write may already be newer).
                Some(e) => self.observe_entry(e),
                None => self.put_pv(name, None),
            },
            |all| {
                // A relist may be served from a lagging API server cache: keep what is
                // newer, drop what is gone.
                let all: Vec<PvEntry> = all
                    .into_values()
                    .map(|e| match self.pvs.get(&e.name) {
                        Some(old) if !not_older(&old.resource_version, &e.resource_version) => {
                            old.clone()
                        }
                        _ => e,
                    })
                    .collect();
                self.pvs.clear();
                self.handles.clear();
                for entry in all {
                    self.put_pv(entry.name.clone(), Some(entry));
                }
            },
        );
        if synced {
            self.ready.pvs.store(true, Ordering::SeqCst);
        }
        self.changed.notify_waiters();
    }

    fn on_node_event(&self, event: Event<Node>, pending: &mut HashMap<String, bool>) {
        let synced = Self::watch_event(
            event,
            pending,
            |n| Some(out_of_service(n)),
            |n| n.name_any(),
            |name, v| match v {
                Some(oos) => {
                    self.nodes.insert(name, oos);
                }
                None => {
                    self.nodes.remove(&name);
                }
            },
            |all| {
                self.nodes.clear();
                for (k, v) in all {
                    self.nodes.insert(k, v);
                }
            },
        );
        if synced {
            self.ready.nodes.store(true, Ordering::SeqCst);
        }
    }

    fn on_csinode_event(&self, event: Event<CSINode>, pending: &mut HashMap<String, String>) {
        let driver = self.driver.clone();
        Self::watch_event(
            event,
            pending,
            |c| {
                c.spec
                    .drivers
                    .iter()
                    .find(|d| d.name == driver)
                    .map(|d| d.node_id.clone())
            },
            |c| c.name_any(),
            |name, v| match v {
                Some(id) => {
                    self.csinodes.insert(name, id);
                }
                None => {
                    self.csinodes.remove(&name);
                }
            },
            |all| {
                self.csinodes.clear();
                for (k, v) in all {
                    self.csinodes.insert(k, v);
                }
            },
        );
    }

    /// The Node a node id names: the one whose CSINode lists this driver with that id,
    /// else the Node of that very name (node id = host name = Node name, the common case).
    pub fn node_name_of(&self, node: &NodeId) -> String {
        self.csinodes
            .iter()
            .find(|e| e.value() == node.as_str())
            .map(|e| e.key().clone())
            .unwrap_or_else(|| node.as_str().to_owned())
    }

    /// The node id the driver reported on Node `name` (CSINode), else the name itself.
    pub fn node_id_on(&self, name: &str) -> Option<NodeId> {
        match self.csinodes.get(name) {
            Some(id) => NodeId::parse(id.value()).ok(),
            None => NodeId::parse(name).ok(),
        }
    }

    fn on_va_event(&self, event: Event<VolumeAttachment>, pending: &mut HashMap<String, VaEntry>) {
        let synced = Self::watch_event(
            event,
            pending,
            |va| self.va_entry(va),
            |va| va.name_any(),
            |name, v| match v {
                Some(v) => {
                    self.vas.insert(name, v);
                }
                None => {
                    self.vas.remove(&name);
                }
            },
            |all| {
                self.vas.clear();
                for (k, v) in all {
                    self.vas.insert(k, v);
                }
            },
        );
        if synced {
            self.ready.vas.store(true, Ordering::SeqCst);
        }
    }

    pub fn pv_entry(&self, pv: &PersistentVolume) -> Option<PvEntry> {
        let csi = pv.spec.as_ref()?.csi.as_ref()?;
        if csi.driver != self.driver {
            return None;
        }
        let volume_id = VolumeId::parse(&csi.volume_handle).ok()?;
        let claim = pv
            .spec
            .as_ref()?
            .claim_ref
            .as_ref()
            .and_then(|c| Some((c.namespace.clone()?, c.name.clone()?)));
        let claim_uid = pv
            .spec
            .as_ref()?
            .claim_ref
            .as_ref()
            .and_then(|c| c.uid.clone());
        let other_annotation_bytes = pv
            .annotations()
            .iter()
            .filter(|(k, _)| *k != super::ANNOTATION_STATE && *k != super::ANNOTATION_NODES)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        Some(PvEntry {
            other_annotation_bytes,
            uid: pv.uid(),
            claim_uid,
            name: pv.name_any(),
            volume_id,
            resource_version: pv.resource_version().unwrap_or_default(),
            attachment: pv.annotations().get(super::ANNOTATION_STATE).cloned(),
            claim,
            sharing: sharing_of(pv),
        })
    }

    pub fn va_entry(&self, va: &VolumeAttachment) -> Option<VaEntry> {
        if va.spec.attacher != self.driver {
            return None;
        }
        // spec.nodeName is the Node's name; the attacher records the node id it passed to
        // ControllerPublish in this annotation, and CSINode maps one to the other.
        let node = va
            .annotations()
            .get(VA_NODE_ID)
            .and_then(|id| NodeId::parse(id).ok())
            .or_else(|| self.node_id_on(&va.spec.node_name))?;
        Some(VaEntry {
            pv_name: va.spec.source.persistent_volume_name.clone()?,
            node,
            attached: va.status.as_ref().is_some_and(|s| s.attached),
            created: va.metadata.creation_timestamp.as_ref().and_then(to_chrono),
        })
    }

    fn put_pv(&self, name: String, entry: Option<PvEntry>) {
        if let Some((_, old)) = self.pvs.remove(&name) {
            let empty = self
                .handles
                .get_mut(&old.volume_id)
                .is_some_and(|mut names| {
                    names.remove(&name);
                    names.is_empty()
                });
            if empty {
                self.handles.remove_if(&old.volume_id, |_, n| n.is_empty());
            }
        }
        if let Some(entry) = entry {
            self.handles
                .entry(entry.volume_id.clone())
                .or_default()
                .insert(name.clone());
            self.pvs.insert(name, entry);
        }
    }

    fn observe_entry(&self, entry: PvEntry) {
        let keep_old = self
            .pvs
            .get(&entry.name)
            .is_some_and(|old| !not_older(&old.resource_version, &entry.resource_version));
        if !keep_old {
            self.put_pv(entry.name.clone(), Some(entry));
        }
    }

    /// Records a PV read or written by us, unless the cache already has a newer one.
    pub fn observe_pv(&self, pv: &PersistentVolume) {
        if let Some(entry) = self.pv_entry(pv) {
            self.observe_entry(entry);
        }
    }

    /// The PV of `volume`, when exactly one PV carries its handle.
    pub fn pv_for(&self, volume: &VolumeId) -> Option<PvEntry> {
        match self.pv_names_for(volume).as_slice() {
            [name] => self.pvs.get(name).map(|e| e.clone()),
            _ => None,
        }
    }

    /// Every PV name carrying `volume` as its handle.
    pub fn pv_names_for(&self, volume: &VolumeId) -> Vec<String> {
        self.handles
            .get(volume)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for the PV of `volume` to appear in the cache (a PV that
    /// was created a moment ago may not have reached the watch yet).
    pub async fn wait_pv_for(&self, volume: &VolumeId, timeout: Duration) -> Option<PvEntry> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if let Some(e) = self.pv_for(volume) {
                return Some(e);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    pub fn pvs(&self) -> Vec<PvEntry> {
        self.pvs.iter().map(|e| e.clone()).collect()
    }

    pub fn nodes_known(&self) -> bool {
        self.ready.nodes.load(Ordering::SeqCst)
    }

    pub fn node_exists(&self, node: &NodeId) -> bool {
        self.nodes
            .get(&self.node_name_of(node))
            .is_some_and(|oos| !*oos)
    }

    pub fn attachments_known(&self) -> bool {
        self.ready.vas.load(Ordering::SeqCst) && self.ready.pvs.load(Ordering::SeqCst)
    }

    pub fn attachments(&self) -> Vec<(VolumeId, VaEntry)> {
        self.vas
            .iter()
            .filter_map(|va| Some((self.volume_of(&va.pv_name)?, va.clone())))
            .collect()
    }

    /// The volume a PV (by name) holds; a PV's handle never changes.
    pub fn volume_of(&self, pv_name: &str) -> Option<VolumeId> {
        self.pvs.get(pv_name).map(|pv| pv.volume_id.clone())
    }

    /// Resolves once every watch has listed its objects at least once.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.ready.pvs.load(Ordering::SeqCst)
                && self.ready.nodes.load(Ordering::SeqCst)
                && self.ready.vas.load(Ordering::SeqCst)
            {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16 point 8: resourceVersions are opaque. Only two versions of one object are
    /// ever compared, numerically only when both are numbers; anything else is taken as
    /// the newer (the watch delivers in order).
    #[test]
    fn resource_versions_are_compared_only_when_both_are_numbers() {
        assert!(not_older("100", "101"));
        assert!(
            !not_older("101", "100"),
            "a lagging relist never moves a PV back"
        );
        assert!(not_older("100", "100"));
        for (current, candidate) in [("abc", "abd"), ("100", "x7f"), ("a1", "99")] {
            assert!(not_older(current, candidate), "{current} → {candidate}");
        }
    }
}
