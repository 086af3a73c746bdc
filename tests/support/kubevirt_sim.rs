//! KubeVirt's migration as its controllers really run it, played against the fake API
//! server (read from kubevirt/kubevirt's migration controller and virt-handler):
//!
//! 1. a VirtualMachineInstanceMigration is created: phase Pending, no target anywhere;
//! 2. virt-controller creates the target virt-launcher pod (labels
//!    `kubevirt.io/created-by` = VMI uid, `kubevirt.io/migrationJobUID` = VMIM uid,
//!    annotation `kubevirt.io/migrationJobName`): phase Scheduling; the scheduler binds it
//!    to a node, and *then* the attach-detach controller asks for the volume there
//!    (ControllerPublish of the target) — no KubeVirt object names that node yet;
//! 3. once the pod is Ready (which needed the attach): Scheduled; at target hand-off the
//!    VMI's `status.migrationState` gets the migration uid, target node and the
//!    migration configuration (completionTimeoutPerGiB, allowPostCopy…), and the VMI
//!    the label `kubevirt.io/migrationTargetNodeName`; PreparingTarget, TargetReady;
//! 4. Running: virt-handler stamps `migrationState.startTimestamp`;
//! 5. Succeeded or Failed: the VMI's state is marked completed/failed (and on success its
//!    node is the target); only now is the VMIM's own `status.migrationState` filled.
#![allow(dead_code)]

use serde_json::{json, Value};

use super::fake_kube::FakeKube;

pub const NS: &str = "vms";
const VMIMS: &str = "virtualmachineinstancemigrations";
const VMIS: &str = "virtualmachineinstances";

pub struct Migration {
    fake: FakeKube,
    pub name: String,
    pub uid: String,
    pub vmi: String,
    claim: String,
    source: String,
    target: Option<String>,
    phase: String,
}

impl Migration {
    /// Step 1: `virtctl migrate` creates the object; KubeVirt marks it Pending.
    pub fn create(fake: &FakeKube, name: &str, vmi: &str, claim: &str) -> Migration {
        let source = fake
            .get_in(VMIS, NS, vmi)
            .and_then(|v| v["status"]["nodeName"].as_str().map(str::to_owned))
            .expect("the VMI runs somewhere");
        let m = Migration {
            fake: fake.clone(),
            name: name.into(),
            uid: format!("vmim-uid-{name}"),
            vmi: vmi.into(),
            claim: claim.into(),
            source,
            target: None,
            phase: "Pending".into(),
        };
        m.write_vmim(None);
        m
    }

    /// Steps 1–2 at once: created, its target pod bound to `node` (phase Scheduling).
    pub fn start(fake: &FakeKube, name: &str, vmi: &str, claim: &str, node: &str) -> Migration {
        let mut m = Self::create(fake, name, vmi, claim);
        m.schedule(node);
        m
    }

    pub fn target_pod_name(&self) -> String {
        format!("virt-launcher-{}-{}", self.vmi, self.name)
    }

    fn write_vmim(&self, state: Option<Value>) {
        let mut status = json!({"phase": self.phase});
        if let Some(s) = state {
            status["migrationState"] = s;
        }
        self.fake.put_in(
            VMIMS,
            NS,
            json!({"metadata": {"name": self.name, "uid": self.uid,
                "labels": {"kubevirt.io/vmi-name": self.vmi}},
                "spec": {"vmiName": self.vmi}, "status": status}),
        );
    }

    fn set_phase(&mut self, phase: &str) {
        self.phase = phase.into();
        self.write_vmim(None);
    }

    fn update_vmi(&self, f: impl FnOnce(&mut Value)) {
        let mut vmi = self.fake.get_in(VMIS, NS, &self.vmi).expect("VMI");
        f(&mut vmi);
        self.fake.put_in(VMIS, NS, vmi);
    }

    /// Step 2: the target pod exists, Pending, bound to `node`; the VMIM is Scheduling.
    pub fn schedule(&mut self, node: &str) {
        self.target = Some(node.into());
        let mut pod =
            super::fake_kube::launcher_pod(&self.target_pod_name(), &self.vmi, &self.claim, node);
        pod["metadata"]["labels"]["kubevirt.io/migrationJobUID"] = json!(self.uid);
        pod["metadata"]["annotations"] = json!({"kubevirt.io/migrationJobName": self.name});
        pod["status"]["phase"] = json!("Pending");
        self.fake.put_in("pods", NS, pod);
        self.set_phase("Scheduling");
    }

    /// Step 3: the target pod is Ready and handed off with `config` (KubeVirt's
    /// migrationConfiguration: the cluster's, or a MigrationPolicy's).
    pub fn hand_off(&mut self, config: Value) {
        let target = self.target.clone().expect("scheduled first");
        let mut pod = self
            .fake
            .get_in("pods", NS, &self.target_pod_name())
            .expect("target pod");
        pod["status"]["phase"] = json!("Running");
        self.fake.put_in("pods", NS, pod);
        self.set_phase("Scheduled");
        let (uid, source, pod) = (
            self.uid.clone(),
            self.source.clone(),
            self.target_pod_name(),
        );
        self.update_vmi(|v| {
            v["status"]["migrationState"] = json!({"migrationUid": uid, "targetNode": target,
                "sourceNode": source, "targetPod": pod, "migrationConfiguration": config});
            v["metadata"]["labels"]["kubevirt.io/migrationTargetNodeName"] = json!(target);
        });
        self.set_phase("PreparingTarget");
        self.set_phase("TargetReady");
    }

    /// Step 4: memory starts moving at `at`.
    pub fn run(&mut self, at: chrono::DateTime<chrono::Utc>) {
        self.update_vmi(|v| {
            v["status"]["migrationState"]["startTimestamp"] = json!(at.to_rfc3339());
        });
        self.set_phase("Running");
    }

    /// The default configuration a KubeVirt CR without overrides hands off.
    pub fn default_config() -> Value {
        json!({"completionTimeoutPerGiB": 150, "progressTimeout": 150,
            "allowPostCopy": false, "allowAutoConverge": false})
    }

    /// Steps 3–5 for a migration that goes through: hand-off, run, success.
    pub fn complete(&mut self) {
        if self.phase == "Scheduling" {
            self.hand_off(Self::default_config());
        }
        if self.phase != "Running" {
            self.run(chrono::Utc::now());
        }
        self.succeed();
    }

    /// Step 5, success: the guest runs on the target; the VMIM's state is copied now.
    pub fn succeed(&mut self) {
        let target = self.target.clone().expect("scheduled first");
        let now = chrono::Utc::now().to_rfc3339();
        let mut state = Value::Null;
        self.update_vmi(|v| {
            v["status"]["migrationState"]["completed"] = json!(true);
            v["status"]["migrationState"]["endTimestamp"] = json!(now);
            v["status"]["nodeName"] = json!(target);
            state = v["status"]["migrationState"].clone();
        });
        self.phase = "Succeeded".into();
        self.write_vmim(Some(state));
    }

    /// Step 5, failure: marked failed; KubeVirt deletes the target pod.
    pub fn fail(&mut self) {
        let now = chrono::Utc::now().to_rfc3339();
        let mut state = Value::Null;
        let (uid, target) = (self.uid.clone(), self.target.clone());
        self.update_vmi(|v| {
            let s = &mut v["status"]["migrationState"];
            if s["migrationUid"] != json!(uid) {
                // Failed before hand-off: KubeVirt still records this migration.
                *s = json!({"migrationUid": uid, "targetNode": target});
            }
            s["failed"] = json!(true);
            s["endTimestamp"] = json!(now);
            state = s.clone();
        });
        self.phase = "Failed".into();
        self.write_vmim(Some(state));
        self.fake.remove_in("pods", NS, &self.target_pod_name());
    }

    /// `virtctl migrate-cancel` before hand-off: the object is deleted, so is the pod.
    pub fn cancel(&self) {
        self.fake.remove_in(VMIMS, NS, &self.name);
        self.fake.remove_in("pods", NS, &self.target_pod_name());
    }
}
