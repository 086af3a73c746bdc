//! Who uses a claim: the pods that mount it, reduced to the VM they serve, and the
//! migration target pod KubeVirt created for a VMIM.

use kube::ResourceExt;

use crate::ids::NodeId;

/// Label KubeVirt puts on virt-launcher pods: the UID of the VMI they run.
pub const CREATED_BY: &str = "kubevirt.io/created-by";
/// Label on a migration's target pod: the VirtualMachineInstanceMigration's uid.
pub const MIGRATION_JOB_UID: &str = "kubevirt.io/migrationJobUID";
/// Annotation on the target pod: the migration's name.
pub const MIGRATION_JOB_NAME: &str = "kubevirt.io/migrationJobName";

/// One pod using a claim, reduced to whom it belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub node: Option<String>,
    /// UID of the VMI the pod serves (virt-launcher label), if any.
    pub vmi_uid: Option<String>,
    /// The VMI owning the pod (its ownerReference; KubeVirt's `vm.kubevirt.io/name`
    /// label is deprecated and holds the guest's host name).
    pub vm_name: Option<String>,
    /// A migration target pod: the VMIM's uid (`kubevirt.io/migrationJobUID`) and name
    /// (annotation `kubevirt.io/migrationJobName`).
    pub migration_uid: Option<String>,
    pub migration_name: Option<String>,
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
                vm_name: p
                    .owner_references()
                    .iter()
                    .find(|o| o.kind == "VirtualMachineInstance")
                    .map(|o| o.name.clone()),
                migration_uid: label(MIGRATION_JOB_UID),
                migration_name: p.annotations().get(MIGRATION_JOB_NAME).cloned(),
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

/// The target pod KubeVirt created for a migration of the VMI `vmi_uid` (when known) on
/// `target`: how a dual attach is tied to its migration at ControllerPublish time, when no
/// KubeVirt object names the target node yet (it is written to the VMI only at hand-off,
/// once this very pod is Ready, which needs the attach).
pub fn target_pod<'a>(
    pods: &'a [PodFacts],
    vmi_uid: Option<&str>,
    target: &NodeId,
) -> Option<&'a PodFacts> {
    pods.iter().find(|p| {
        p.node.as_deref() == Some(target.as_str())
            && p.migration_uid.is_some()
            && vmi_uid.is_none_or(|u| p.vmi_uid.as_deref() == Some(u))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, vmi: Option<&str>, owner: Option<&str>) -> PodFacts {
        PodFacts {
            name: name.into(),
            node: Some(node.into()),
            vmi_uid: vmi.map(str::to_owned),
            vm_name: vmi.map(|v| format!("vm-{v}")),
            owner_pod: owner.map(str::to_owned),
            migration_uid: None,
            migration_name: None,
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

    #[test]
    fn the_target_pod_is_found_by_node_vmi_and_migration_label() {
        let b = NodeId::parse("node-b").unwrap();
        let mut source = pod("virt-launcher-x-1", "node-a", Some("u1"), None);
        source.migration_uid = None;
        let mut target = pod("virt-launcher-x-2", "node-b", Some("u1"), None);
        target.migration_uid = Some("m1".into());
        let mut other_vm = pod("virt-launcher-y-2", "node-b", Some("u2"), None);
        other_vm.migration_uid = Some("m9".into());
        let plain_on_b = pod("virt-launcher-x-3", "node-b", Some("u1"), None);
        let pods = [source, other_vm.clone(), plain_on_b, target];
        assert_eq!(
            target_pod(&pods, Some("u1"), &b).unwrap().name,
            "virt-launcher-x-2"
        );
        assert_eq!(
            target_pod(&[other_vm], Some("u1"), &b),
            None,
            "another VM's target pod"
        );
        assert_eq!(
            target_pod(&pods[..3], Some("u1"), &b),
            None,
            "a pod on B that is not a migration target"
        );
    }
}
