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

use crate::attachment::deadline::MigrationClock;
use crate::attachment::state::{MigrationPhase, MigrationRef};
use crate::ids::NodeId;

pub mod clock;
pub mod pods;

pub use clock::parse_quantity_bytes;
pub use pods::{foreign_pods, pods_using, target_pod, PodFacts};

pub const GROUP_VERSION: &str = "kubevirt.io/v1";
const VMI_PLURAL: &str = "virtualmachineinstances";
const VMIM_PLURAL: &str = "virtualmachineinstancemigrations";
/// KubeVirt deletes a migration target pod still pending after at most 15 minutes
/// (its catch-all pending timeout); the deadline allows for that start-up.
pub const TARGET_STARTUP_ALLOWANCE: Duration = Duration::from_secs(15 * 60);
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
    /// Claims of its volumes: persistentVolumeClaim, dataVolume (same-named claim),
    /// ephemeral.persistentVolumeClaim and memoryDump.
    pub claims: Vec<String>,
    /// Guest memory in bytes, as KubeVirt sizes a migration.
    pub memory_bytes: Option<u64>,
    /// Capacity of the volumes a storage migration moves (status.migratedVolumes).
    pub migrated_volume_bytes: u64,
    /// Sizes of local disks copied by a block migration (emptyDisk capacities).
    pub ephemeral_bytes: u64,
    /// status.migrationMethod is BlockMigration.
    pub block_migration: bool,
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
    /// startTimestamp: memory transfer began.
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    /// migrationConfiguration, written by KubeVirt at target hand-off.
    pub config: Option<MigrationConfig>,
}

/// The part of KubeVirt's migration configuration that changes its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    pub per_gib_secs: Option<u64>,
    pub allow_post_copy: bool,
    /// `None`: a KubeVirt without the field, where allowPostCopy alone switches.
    pub allow_workload_disruption: Option<bool>,
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

fn quantity_at(v: &Value, path: &[&str]) -> Option<u64> {
    str_at(v, path).and_then(parse_quantity_bytes)
}

pub fn vmi_entry(obj: &DynamicObject) -> VmiEntry {
    let (namespace, name, uid) = meta(obj);
    let d = &obj.data;
    let volumes = d["spec"]["volumes"].as_array();
    let claims = volumes
        .into_iter()
        .flatten()
        .filter_map(|v| {
            str_at(v, &["persistentVolumeClaim", "claimName"])
                .or_else(|| str_at(v, &["dataVolume", "name"]))
                .or_else(|| str_at(v, &["ephemeral", "persistentVolumeClaim", "claimName"]))
                .or_else(|| str_at(v, &["memoryDump", "claimName"]))
        })
        .map(str::to_owned)
        .collect();
    // KubeVirt sizes a migration by the memory request, overridden by an explicit guest
    // memory (virt-launcher's getVMIMigrationDataSize).
    let memory_bytes = quantity_at(d, &["spec", "domain", "memory", "guest"])
        .or_else(|| quantity_at(d, &["spec", "domain", "resources", "requests", "memory"]));
    let migrated_volume_bytes = d["status"]["migratedVolumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| quantity_at(v, &["sourcePVCInfo", "capacity", "storage"]))
        .fold(0u64, u64::saturating_add);
    let ephemeral_bytes = volumes
        .into_iter()
        .flatten()
        .filter_map(|v| quantity_at(v, &["emptyDisk", "capacity"]))
        .fold(0u64, u64::saturating_add);
    let state = &d["status"]["migrationState"];
    let config = &state["migrationConfiguration"];
    let migration = str_at(state, &["migrationUid"]).map(|uid| VmiMigrationState {
        uid: uid.to_owned(),
        target_node: str_at(state, &["targetNode"]).map(str::to_owned),
        completed: state["completed"].as_bool().unwrap_or(false),
        failed: state["failed"].as_bool().unwrap_or(false),
        aborted: str_at(state, &["abortStatus"]) == Some("Succeeded"),
        started: str_at(state, &["startTimestamp"]).and_then(|t| t.parse().ok()),
        config: config.is_object().then(|| MigrationConfig {
            per_gib_secs: config["completionTimeoutPerGiB"].as_u64(),
            allow_post_copy: config["allowPostCopy"].as_bool().unwrap_or(false),
            allow_workload_disruption: config["allowWorkloadDisruption"].as_bool(),
        }),
    });
    VmiEntry {
        namespace,
        name,
        uid,
        claims,
        memory_bytes,
        migrated_volume_bytes,
        ephemeral_bytes,
        block_migration: str_at(d, &["status", "migrationMethod"]) == Some("BlockMigration"),
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

    /// The uid of a VMI, for Events about it.
    pub fn vmi_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.vmis
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|v| v.uid.clone())
            .filter(|u| !u.is_empty())
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

    /// The migration whose target pod on `target` asks for the volume: matched by the
    /// pod KubeVirt created for it (labels `kubevirt.io/migrationJobUID` and
    /// `kubevirt.io/created-by`), as KubeVirt itself finds its target pods. `None` when
    /// no such pod exists, or its migration is already over.
    pub fn target_migration(
        &self,
        namespace: &str,
        vmi: Option<&VmiEntry>,
        pods: &[PodFacts],
        target: &NodeId,
    ) -> Option<MigrationRef> {
        let pod = target_pod(pods, vmi.map(|v| v.uid.as_str()), target)?;
        let uid = pod.migration_uid.clone()?;
        let known = self
            .vmims
            .iter()
            .find(|m| m.namespace == namespace && m.uid == uid)
            .map(|m| m.clone());
        if known.as_ref().is_some_and(VmimEntry::finished) {
            tracing::info!(pod = %pod.name, migration_uid = %uid, "target pod of a finished migration; not matching it");
            return None;
        }
        let name = pod
            .migration_name
            .clone()
            .or_else(|| known.as_ref().map(|m| m.name.clone()))
            .unwrap_or_else(|| uid.clone());
        let vmi_name = vmi
            .map(|v| v.name.clone())
            .or_else(|| known.map(|m| m.vmi))
            .or_else(|| pod.vm_name.clone())?;
        Some(MigrationRef {
            namespace: namespace.to_owned(),
            name,
            uid,
            vmi: vmi_name,
        })
    }

    /// The clock of migration `uid` of `vmi` (or of a migration not matched yet).
    pub fn clock(&self, vmi: &VmiEntry, uid: Option<&str>) -> Option<MigrationClock> {
        clock::clock(vmi, uid, self.default_per_gib_secs)
    }

    /// The clock of a matched migration, from its VMI as the cache shows it now.
    pub fn clock_of(&self, m: &MigrationRef) -> Option<MigrationClock> {
        let vmi = self.vmis.get(&(m.namespace.clone(), m.vmi.clone()))?;
        self.clock(&vmi, Some(&m.uid))
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
