//! KubeVirt awareness without KubeVirt's types: VirtualMachineInstances and their
//! migrations are watched through kube's dynamic API once discovery shows them. Without
//! KubeVirt installed nothing here runs and the attach rules work as before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use crate::attachment::state::{DeadlineBasis, MigrationPhase, MigrationRef};
use crate::ids::NodeId;

pub const GROUP_VERSION: &str = "kubevirt.io/v1";
const VMI_PLURAL: &str = "virtualmachineinstances";
const VMIM_PLURAL: &str = "virtualmachineinstancemigrations";
/// KubeVirt deletes a migration target pod still pending after at most 15 minutes
/// (its catch-all pending timeout); the deadline allows for that start-up.
pub const TARGET_STARTUP_ALLOWANCE: Duration = Duration::from_secs(15 * 60);
/// Label KubeVirt puts on virt-launcher pods: the UID of the VMI they run.
const CREATED_BY: &str = "kubevirt.io/created-by";
const VM_NAME: &str = "vm.kubevirt.io/name";
/// How often discovery is retried while KubeVirt is not installed.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(60);

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: GROUP_VERSION.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// What the driver needs of a VirtualMachineInstance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmiEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Claims of its volumes (a DataVolume's claim has the DataVolume's name).
    pub claims: Vec<String>,
    /// Guest memory in bytes, as KubeVirt sizes a migration.
    pub memory_bytes: Option<u64>,
    /// completionTimeoutPerGiB of the migration configuration KubeVirt applied.
    pub per_gib_secs: Option<u64>,
    pub node: Option<String>,
    /// status.migrationState: the running or last migration.
    pub migration: Option<VmiMigrationState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmiMigrationState {
    pub uid: String,
    pub target_node: Option<String>,
    pub completed: bool,
    pub failed: bool,
    pub aborted: bool,
}

/// What the driver needs of a VirtualMachineInstanceMigration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmimEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub vmi: String,
    pub phase: String,
    pub created: String,
    pub target_node: Option<String>,
    /// Cancelled: abort succeeded, or the object is being deleted (how a cancel is asked).
    pub aborted: bool,
}

impl VmimEntry {
    fn finished(&self) -> bool {
        matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }

    pub fn phase(&self) -> MigrationPhase {
        match self.phase.as_str() {
            "Succeeded" => MigrationPhase::Succeeded,
            "Failed" => MigrationPhase::Failed {
                aborted: self.aborted,
            },
            "" => MigrationPhase::Running("Pending".into()),
            p => MigrationPhase::Running(p.into()),
        }
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn meta(obj: &DynamicObject) -> (String, String, String) {
    (
        obj.namespace().unwrap_or_default(),
        obj.name_any(),
        obj.uid().unwrap_or_default(),
    )
}

pub fn vmi_entry(obj: &DynamicObject) -> VmiEntry {
    let (namespace, name, uid) = meta(obj);
    let d = &obj.data;
    let claims = d["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            str_at(v, &["persistentVolumeClaim", "claimName"])
                .or_else(|| str_at(v, &["dataVolume", "name"]))
        })
        .map(str::to_owned)
        .collect();
    // KubeVirt sizes a migration by the memory request, overridden by an explicit guest
    // memory (virt-launcher's getVMIMigrationDataSize).
    let memory_bytes = str_at(d, &["spec", "domain", "memory", "guest"])
        .or_else(|| str_at(d, &["spec", "domain", "resources", "requests", "memory"]))
        .and_then(parse_quantity_bytes);
    let state = &d["status"]["migrationState"];
    let migration = str_at(state, &["migrationUid"]).map(|uid| VmiMigrationState {
        uid: uid.to_owned(),
        target_node: str_at(state, &["targetNode"]).map(str::to_owned),
        completed: state["completed"].as_bool().unwrap_or(false),
        failed: state["failed"].as_bool().unwrap_or(false),
        aborted: str_at(state, &["abortStatus"]) == Some("Succeeded"),
    });
    VmiEntry {
        namespace,
        name,
        uid,
        claims,
        memory_bytes,
        per_gib_secs: state["migrationConfiguration"]["completionTimeoutPerGiB"].as_u64(),
        node: str_at(d, &["status", "nodeName"]).map(str::to_owned),
        migration,
    }
}

pub fn vmim_entry(obj: &DynamicObject) -> VmimEntry {
    let (namespace, name, uid) = meta(obj);
    let d = &obj.data;
    let state = &d["status"]["migrationState"];
    VmimEntry {
        namespace,
        name,
        uid,
        vmi: str_at(d, &["spec", "vmiName"])
            .unwrap_or_default()
            .to_owned(),
        phase: str_at(d, &["status", "phase"])
            .unwrap_or_default()
            .to_owned(),
        created: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        target_node: str_at(state, &["targetNode"]).map(str::to_owned),
        aborted: str_at(state, &["abortStatus"]) == Some("Succeeded")
            || obj.metadata.deletion_timestamp.is_some(),
    }
}

/// Bytes in a Kubernetes quantity ("2Gi", "2048Mi", "1.5G", "1e9"); fractions round up.
pub fn parse_quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let bytes = (number * multiplier).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// KubeVirt's migration deadline for a guest of `memory_bytes`: the completion timeout
/// (per-GiB seconds × data size, in GB rounded up exactly as KubeVirt's
/// `ScaledValue(Giga)` does) plus the target pod's start-up allowance.
pub fn completion_deadline(
    vmi: &str,
    memory_bytes: u64,
    per_gib_secs: u64,
) -> (Duration, DeadlineBasis) {
    let data_gb = memory_bytes.div_ceil(1_000_000_000);
    let startup_secs = TARGET_STARTUP_ALLOWANCE.as_secs();
    let secs = per_gib_secs
        .saturating_mul(data_gb)
        .saturating_add(startup_secs);
    (
        Duration::from_secs(secs),
        DeadlineBasis::Kubevirt {
            vmi: vmi.to_owned(),
            data_gb,
            per_gib_secs,
            startup_secs,
        },
    )
}

/// One pod using a claim, reduced to whom it belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub node: Option<String>,
    /// UID of the VMI the pod serves (virt-launcher label), if any.
    pub vmi_uid: Option<String>,
    pub vm_name: Option<String>,
    /// Owning pod (a hotplug attachment pod belongs to its virt-launcher pod).
    pub owner_pod: Option<String>,
}

/// The non-terminated pods of `pods` that mount `claim`.
pub fn pods_using(pods: &[k8s_openapi::api::core::v1::Pod], claim: &str) -> Vec<PodFacts> {
    pods.iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .into_iter()
                .flatten()
                .any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == claim)
                })
        })
        .map(|p| {
            let label = |k: &str| p.labels().get(k).cloned();
            PodFacts {
                name: p.name_any(),
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                vmi_uid: label(CREATED_BY),
                vm_name: label(VM_NAME),
                owner_pod: p
                    .owner_references()
                    .iter()
                    .find(|o| o.kind == "Pod")
                    .map(|o| o.name.clone()),
            }
        })
        .collect()
}

/// Pods that do not belong to the VM holding the volume, as "namespace/pod (why)". The
/// VM is the known VMI, else the one whose pods run on the holder node.
pub fn foreign_pods(
    namespace: &str,
    pods: &[PodFacts],
    vmi_uid: Option<&str>,
    holder: &NodeId,
) -> Vec<String> {
    let identity = |p: &PodFacts| -> Option<String> {
        p.vmi_uid.clone().or_else(|| {
            let owner = pods
                .iter()
                .find(|o| Some(&o.name) == p.owner_pod.as_ref())?;
            owner.vmi_uid.clone()
        })
    };
    let owner = vmi_uid.map(str::to_owned).or_else(|| {
        pods.iter()
            .filter(|p| p.node.as_deref() == Some(holder.as_str()))
            .find_map(identity)
    });
    pods.iter()
        .filter(|p| owner.is_none() || identity(p) != owner)
        .map(|p| {
            let why = match (&identity(p), &p.vm_name) {
                (Some(_), Some(vm)) => format!("VM {vm}"),
                (Some(uid), None) => format!("VMI uid {uid}"),
                (None, _) => "not a KubeVirt VM".into(),
            };
            let node = p.node.as_deref().unwrap_or("unscheduled");
            format!("{namespace}/{} on {node} ({why})", p.name)
        })
        .collect()
}

/// Watch caches of VMIs and VMIMs, filled once KubeVirt is found.
pub struct KubevirtCache {
    vmis: DashMap<(String, String), VmiEntry>,
    vmims: DashMap<(String, String), VmimEntry>,
    present: AtomicBool,
    default_per_gib_secs: u64,
}

type Key = (String, String);

impl KubevirtCache {
    pub fn new(default_per_gib_secs: u64) -> Arc<Self> {
        Arc::new(KubevirtCache {
            vmis: DashMap::new(),
            vmims: DashMap::new(),
            present: AtomicBool::new(false),
            default_per_gib_secs,
        })
    }

    /// Looks for KubeVirt's API now and every minute until found, then watches it.
    pub fn spawn(self: &Arc<Self>, client: Client) {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                match client.list_api_group_resources(GROUP_VERSION).await {
                    Ok(list) => {
                        let has = |p: &str| list.resources.iter().any(|r| r.name == p);
                        if has(VMI_PLURAL) && has(VMIM_PLURAL) {
                            tracing::info!("KubeVirt found: live migrations are matched to VirtualMachineInstanceMigrations");
                            cache.start_watches(client);
                            return;
                        }
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "KubeVirt discovery failed; retrying")
                    }
                }
                tokio::time::sleep(DISCOVERY_INTERVAL).await;
            }
        });
    }

    fn start_watches(self: &Arc<Self>, client: Client) {
        self.present.store(true, Ordering::SeqCst);
        let watch = |kind: &'static str, plural: &'static str| {
            let ar = resource(kind, plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed()
        };
        let cache = self.clone();
        let mut vmis = watch("VirtualMachineInstance", VMI_PLURAL);
        tokio::spawn(async move {
            let mut pending = HashMap::new();
            while let Some(event) = vmis.next().await {
                match event {
                    Ok(e) => apply(&cache.vmis, e, &mut pending, vmi_entry),
                    Err(e) => {
                        tracing::warn!(error = %e, "VirtualMachineInstance watch interrupted; retrying")
                    }
                }
            }
        });
        let cache = self.clone();
        let mut vmims = watch("VirtualMachineInstanceMigration", VMIM_PLURAL);
        tokio::spawn(async move {
            let mut pending = HashMap::new();
            while let Some(event) = vmims.next().await {
                match event {
                    Ok(e) => apply(&cache.vmims, e, &mut pending, vmim_entry),
                    Err(e) => {
                        tracing::warn!(error = %e, "VirtualMachineInstanceMigration watch interrupted; retrying")
                    }
                }
            }
        });
    }

    pub fn present(&self) -> bool {
        self.present.load(Ordering::SeqCst)
    }

    /// The VMI using `claim`, preferring one running on `node`.
    pub fn vmi_using(&self, namespace: &str, claim: &str, node: &NodeId) -> Option<VmiEntry> {
        let mut found: Vec<VmiEntry> = self
            .vmis
            .iter()
            .filter(|e| e.namespace == namespace && e.claims.iter().any(|c| c == claim))
            .map(|e| e.clone())
            .collect();
        found.sort_by_key(|v| v.node.as_deref() != Some(node.as_str()));
        found.into_iter().next()
    }

    /// The unfinished migration of `vmi` heading to `target` (or to a node not yet known).
    pub fn running_migration(&self, vmi: &VmiEntry, target: &NodeId) -> Option<MigrationRef> {
        let mut running: Vec<VmimEntry> = self
            .vmims
            .iter()
            .filter(|m| m.namespace == vmi.namespace && m.vmi == vmi.name && !m.finished())
            .map(|m| m.clone())
            .collect();
        running.sort_by(|a, b| b.created.cmp(&a.created));
        let m = running.into_iter().next()?;
        let target_node = m.target_node.clone().or_else(|| {
            vmi.migration
                .as_ref()
                .filter(|s| s.uid == m.uid)
                .and_then(|s| s.target_node.clone())
        });
        if let Some(t) = target_node.filter(|t| t != target.as_str()) {
            tracing::warn!(migration = %m.name, migration_target = %t, node_id = %target, "second attach is not to the migration's target node; not matching it");
            return None;
        }
        Some(MigrationRef {
            namespace: m.namespace,
            name: m.name,
            uid: m.uid,
            vmi: vmi.name.clone(),
        })
    }

    /// The VMI's deadline with KubeVirt's formula, when its memory is known.
    pub fn deadline(&self, vmi: &VmiEntry) -> Option<(Duration, DeadlineBasis)> {
        let per_gib = vmi.per_gib_secs.unwrap_or(self.default_per_gib_secs);
        vmi.memory_bytes
            .map(|bytes| completion_deadline(&vmi.name, bytes, per_gib))
    }

    /// The phase of a migration: from its object while it exists, else from the VMI's
    /// record of the migration with that UID.
    pub fn phase(&self, m: &MigrationRef) -> Option<MigrationPhase> {
        if let Some(e) = self.vmims.get(&(m.namespace.clone(), m.name.clone())) {
            if e.uid == m.uid {
                return Some(e.phase());
            }
        }
        let vmi = self.vmis.get(&(m.namespace.clone(), m.vmi.clone()))?;
        let s = vmi.migration.as_ref().filter(|s| s.uid == m.uid)?;
        match (s.completed, s.failed) {
            (_, true) => Some(MigrationPhase::Failed { aborted: s.aborted }),
            (true, false) => Some(MigrationPhase::Succeeded),
            (false, false) => None,
        }
    }
}

fn apply<V: Clone>(
    map: &DashMap<Key, V>,
    event: Event<DynamicObject>,
    pending: &mut HashMap<Key, V>,
    convert: fn(&DynamicObject) -> V,
) {
    let key = |o: &DynamicObject| (o.namespace().unwrap_or_default(), o.name_any());
    match event {
        Event::Apply(o) => {
            map.insert(key(&o), convert(&o));
        }
        Event::Delete(o) => {
            map.remove(&key(&o));
        }
        Event::Init => pending.clear(),
        Event::InitApply(o) => {
            pending.insert(key(&o), convert(&o));
        }
        // A relist: objects deleted while the watch was down disappear here.
        Event::InitDone => {
            map.clear();
            for (k, v) in pending.drain() {
                map.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_to_bytes() {
        for (q, want) in [
            ("1Gi", 1u64 << 30),
            ("2048Mi", 2u64 << 30),
            ("1G", 1_000_000_000),
            ("1.5Gi", 3u64 << 29),
            ("1e9", 1_000_000_000),
            ("512", 512),
            ("100m", 1),
        ] {
            assert_eq!(parse_quantity_bytes(q), Some(want), "{q}");
        }
        for bad in ["", "Gi", "1Xi", "-1Gi", "1e"] {
            assert_eq!(parse_quantity_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn deadline_follows_kubevirt_defaults() {
        // completionTimeoutPerGiB 150 s × data size (ScaledValue(Giga): GB rounded up)
        // + 15 min pending allowance for the target pod.
        for (gib, data_gb, secs) in [
            (1u64, 2u64, 1200u64),
            (2, 3, 1350),
            (4, 5, 1650),
            (16, 18, 3600),
        ] {
            let (d, basis) = completion_deadline("vm", gib << 30, 150);
            assert_eq!(d, Duration::from_secs(secs), "{gib} GiB");
            assert_eq!(
                basis,
                DeadlineBasis::Kubevirt {
                    vmi: "vm".into(),
                    data_gb,
                    per_gib_secs: 150,
                    startup_secs: 900
                }
            );
            assert!(
                d > Duration::from_secs(300),
                "a fixed 300 s is too short for {gib} GiB"
            );
        }
        // A guest memory given in decimal gigabytes is not rounded further.
        assert_eq!(
            completion_deadline("vm", 4_000_000_000, 150).0,
            Duration::from_secs(4 * 150 + 900)
        );
    }

    fn pod(name: &str, node: &str, vmi: Option<&str>, owner: Option<&str>) -> PodFacts {
        PodFacts {
            name: name.into(),
            node: Some(node.into()),
            vmi_uid: vmi.map(str::to_owned),
            vm_name: vmi.map(|v| format!("vm-{v}")),
            owner_pod: owner.map(str::to_owned),
        }
    }

    #[test]
    fn pods_of_one_vm_pass_others_are_named() {
        let a = NodeId::parse("node-a").unwrap();
        let same = [
            pod("virt-launcher-x-1", "node-a", Some("u1"), None),
            pod("virt-launcher-x-2", "node-b", Some("u1"), None),
            // A hotplug attachment pod belongs to its virt-launcher pod.
            pod("hp-volume-x", "node-a", None, Some("virt-launcher-x-1")),
        ];
        assert!(foreign_pods("vms", &same, Some("u1"), &a).is_empty());
        assert!(foreign_pods("vms", &same, None, &a).is_empty());
        let mixed = [
            pod("virt-launcher-x-1", "node-a", Some("u1"), None),
            pod("virt-launcher-y-1", "node-b", Some("u2"), None),
            pod("backup", "node-c", None, None),
        ];
        let foreign = foreign_pods("vms", &mixed, Some("u1"), &a);
        assert_eq!(
            foreign,
            [
                "vms/virt-launcher-y-1 on node-b (VM vm-u2)",
                "vms/backup on node-c (not a KubeVirt VM)"
            ]
        );
        // Plain pods with no VM at all: every one is named.
        let plain = [
            pod("app-1", "node-a", None, None),
            pod("app-2", "node-b", None, None),
        ];
        assert_eq!(foreign_pods("ns", &plain, None, &a).len(), 2);
    }
}
