//! Offline checks of everything an operator applies: every YAML under deploy/ and
//! examples/ against the Kubernetes schemas (k8s-openapi types; a field the type does not
//! know is an error), flags against `handoff-csi --help`, the driver name everywhere,
//! RBAC against the API calls the controller really makes, and docs against the flags.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use support::fake_kube::{self, FakeKube, Faults};
use support::*;

const DRIVER: &str = "handoff.csi.dev";

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every YAML document under deploy/ and examples/, with its file.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut docs = Vec::new();
    for file in yaml_files("deploy")
        .into_iter()
        .chain(yaml_files("examples"))
    {
        let text = std::fs::read_to_string(&file).unwrap();
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(de)
                .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", file.display()));
            if !v.is_null() {
                docs.push((file.clone(), v));
            }
        }
    }
    assert!(docs.len() > 20, "found only {} documents", docs.len());
    docs
}

/// The first place where `original` has something `round_tripped` lost or changed.
fn lost(original: &Value, round_tripped: &Value, path: &str) -> Option<String> {
    match (original, round_tripped) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(format!("{path}.{k} is not a field of this kind")),
            Some(w) => lost(v, w, &format!("{path}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| lost(v, w, &format!("{path}[{i}]"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        (a, b) => Some(format!("{path}: {a} became {b}")),
    }
}

fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).unwrap();
    match lost(doc, &back, "") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Custom resources k8s-openapi does not know: required keys and nothing unexpected
/// at the top of spec.
fn custom(doc: &Value, required: &[&str], spec_keys: &[&str]) -> Result<(), String> {
    for key in required {
        let mut v = doc;
        for part in key.split('.') {
            v = v.get(part).ok_or_else(|| format!("missing {key}"))?;
        }
    }
    if let Some(spec) = doc.get("spec").and_then(Value::as_object) {
        if let Some(k) = spec.keys().find(|k| !spec_keys.contains(&k.as_str())) {
            return Err(format!("unknown field spec.{k}"));
        }
    }
    Ok(())
}

fn check(doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps, core, policy, rbac, storage};
    let api = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    match (api, kind) {
        ("v1", "Namespace") => strict::<core::v1::Namespace>(doc),
        ("v1", "ServiceAccount") => strict::<core::v1::ServiceAccount>(doc),
        ("v1", "Service") => strict::<core::v1::Service>(doc),
        ("v1", "Secret") => strict::<core::v1::Secret>(doc),
        ("v1", "PersistentVolumeClaim") => strict::<core::v1::PersistentVolumeClaim>(doc),
        ("v1", "Pod") => strict::<core::v1::Pod>(doc),
        ("apps/v1", "Deployment") => strict::<apps::v1::Deployment>(doc),
        ("apps/v1", "DaemonSet") => strict::<apps::v1::DaemonSet>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<rbac::v1::ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            strict::<rbac::v1::ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => strict::<rbac::v1::Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<rbac::v1::RoleBinding>(doc),
        ("storage.k8s.io/v1", "CSIDriver") => strict::<storage::v1::CSIDriver>(doc),
        ("storage.k8s.io/v1", "StorageClass") => strict::<storage::v1::StorageClass>(doc),
        ("policy/v1", "PodDisruptionBudget") => strict::<policy::v1::PodDisruptionBudget>(doc),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization") => Ok(()),
        ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass") => {
            custom(doc, &["metadata.name", "driver", "deletionPolicy"], &[])
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => custom(
            doc,
            &["metadata.name", "spec.selector", "spec.endpoints"],
            &["selector", "endpoints", "namespaceSelector", "jobLabel"],
        ),
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            custom(doc, &["metadata.name", "spec.groups"], &["groups"])
        }
        ("kubevirt.io/v1", "VirtualMachine") => custom(
            doc,
            &[
                "metadata.name",
                "spec.template.spec.domain",
                "spec.template.spec.volumes",
            ],
            &[
                "running",
                "runStrategy",
                "template",
                "dataVolumeTemplates",
                "instancetype",
                "preference",
            ],
        ),
        _ => Err(format!("unknown kind {api}/{kind}")),
    }
}

#[test]
fn the_schema_check_catches_typos_and_wrong_types() {
    let deployment = |container: Value| {
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
            "spec": {"selector": {}, "template": {"spec": {"containers": [container]}}}})
    };
    assert!(check(&deployment(serde_json::json!({"name": "a", "image": "i"}))).is_ok());
    let typo = check(&deployment(serde_json::json!({"name": "a", "imagee": "i"}))).unwrap_err();
    assert!(typo.contains("imagee"), "{typo}");
    assert!(check(&deployment(
        serde_json::json!({"name": "a", "ports": [{"containerPort": "x"}]})
    ))
    .is_err());
    assert!(check(&serde_json::json!({"apiVersion": "v1", "kind": "Nonsense"})).is_err());
}

#[test]
fn every_manifest_matches_the_kubernetes_schema() {
    let mut errors = Vec::new();
    for (file, doc) in documents() {
        if let Err(e) = check(&doc) {
            errors.push(format!(
                "{}: {} {}: {e}",
                file.display(),
                doc["kind"],
                doc["metadata"]["name"]
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

fn containers(doc: &Value) -> Vec<&Value> {
    doc["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|c| c.iter().collect())
        .unwrap_or_default()
}

fn help() -> String {
    help_of(None)
}

/// `handoff-csi [subcommand] --help`.
fn help_of(subcommand: Option<&str>) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handoff-csi"))
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn help_flags() -> BTreeSet<String> {
    flags_in(&help())
}

fn flags_in(help: &str) -> BTreeSet<String> {
    help.split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|f| {
            f.trim_end_matches([',', '.'])
                .split('=')
                .next()
                .unwrap()
                .to_owned()
        })
        .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .collect()
}

#[test]
fn flags_in_manifests_exist_and_the_driver_name_is_consistent() {
    let flags = help_flags();
    assert!(flags.contains("attachment-store"), "{flags:?}");
    assert!(
        help().contains(&format!("[default: {DRIVER}]")),
        "binary default driver name"
    );
    let mut names = Vec::new();
    let mut kustomize_images = BTreeSet::new();
    let mut used_images = BTreeSet::new();
    for (file, doc) in documents() {
        match doc["kind"].as_str().unwrap() {
            "CSIDriver" => names.push(doc["metadata"]["name"].as_str().unwrap().to_owned()),
            "StorageClass" => names.push(doc["provisioner"].as_str().unwrap().to_owned()),
            "VolumeSnapshotClass" => names.push(doc["driver"].as_str().unwrap().to_owned()),
            "Kustomization" => {
                // Overlays (deploy/kubernetes/backends/*) use the base's pins.
                for img in doc["images"].as_array().into_iter().flatten() {
                    assert!(
                        img["newTag"]
                            .as_str()
                            .is_some_and(|t| !t.is_empty() && t != "latest"),
                        "{img}"
                    );
                    kustomize_images.insert(img["name"].as_str().unwrap().to_owned());
                }
                // Flags added by overlay patches exist too.
                for p in doc["patches"].as_array().into_iter().flatten() {
                    let ops: Value = serde_yaml_ng::from_str(p["patch"].as_str().unwrap())
                        .unwrap_or_else(|e| panic!("{}: patch is not YAML: {e}", file.display()));
                    for op in ops.as_array().unwrap() {
                        if let Some(arg) = op["value"].as_str().and_then(|v| v.strip_prefix("--")) {
                            let flag = arg.split('=').next().unwrap();
                            assert!(
                                flags.contains(flag),
                                "{}: --{flag} is not a flag of handoff-csi",
                                file.display()
                            );
                        }
                    }
                }
                let dir = file.parent().unwrap();
                for r in doc["resources"].as_array().unwrap() {
                    assert!(
                        dir.join(r.as_str().unwrap()).exists(),
                        "kustomization lists missing {r}"
                    );
                }
            }
            _ => {}
        }
        for c in containers(&doc) {
            let image = c["image"].as_str().unwrap();
            assert!(
                !image.contains(':'),
                "{}: image {image} must be pinned in kustomization.yaml only",
                file.display()
            );
            used_images.insert(image.to_owned());
            // The driver's own containers: server flags, or a subcommand and its flags.
            let args: Vec<&str> = c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap())
                .collect();
            let (subcommand, args) = match args.first() {
                Some(first) if image == "handoff-csi" && !first.starts_with("--") => {
                    (Some(*first), &args[1..])
                }
                _ => (None, &args[..]),
            };
            let known = match subcommand {
                Some(sub) => flags_in(&help_of(Some(sub))),
                None => flags.clone(),
            };
            for arg in args {
                if let Some(path) = arg.strip_prefix("--kubelet-registration-path=") {
                    assert_eq!(path, format!("/var/lib/kubelet/plugins/{DRIVER}/csi.sock"));
                }
                if image != "handoff-csi" {
                    continue;
                }
                let flag = arg.strip_prefix("--").unwrap().split('=').next().unwrap();
                assert!(
                    known.contains(flag),
                    "{}: --{flag} is not a flag of handoff-csi {}",
                    file.display(),
                    subcommand.unwrap_or("")
                );
                if let Some(name) = arg.strip_prefix("--driver-name=") {
                    names.push(name.to_owned());
                }
            }
        }
        for v in doc["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(p) = v["hostPath"]["path"]
                .as_str()
                .filter(|p| p.contains("/plugins/"))
            {
                assert_eq!(p, format!("/var/lib/kubelet/plugins/{DRIVER}"));
            }
        }
    }
    assert!(names.len() >= 5, "{names:?}");
    assert!(
        names.iter().all(|n| n == DRIVER),
        "driver names differ: {names:?}"
    );
    assert_eq!(
        used_images, kustomize_images,
        "every image pinned once, every pin used"
    );
}

#[test]
fn configuration_docs_cover_every_flag_and_parameter() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    for flag in help_flags() {
        if flag == "help" || flag == "version" {
            continue;
        }
        assert!(
            doc.contains(&format!("`--{flag}`")),
            "docs/configuration.md does not document --{flag}"
        );
    }
    assert!(doc.contains("`migrationTimeoutSeconds`"));
    assert!(doc.contains("`dataPlane`"));
    assert!(doc.contains("`nvmeCtrlLossTmo`"));
    assert!(doc.contains("csi.storage.k8s.io/"));
}

/// (verb, apiGroup, resource) of one API request; `None` for discovery, which every
/// authenticated client may read (system:discovery).
fn rbac_of(method: &str, path: &str, query: &str) -> Option<(String, String, String)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("unexpected path {path}"),
    };
    if rest.is_empty() {
        return None;
    }
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        r => r,
    };
    let collection = rest.len() == 1;
    let verb = match (method, collection) {
        ("GET", true) if query.contains("watch=true") || query.contains("watch=1") => "watch",
        ("GET", true) => "list",
        ("GET", false) => "get",
        ("PATCH", _) => "patch",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("DELETE", _) => "delete",
        (m, _) => panic!("unexpected method {m}"),
    };
    Some((verb.into(), group.into(), rest[0].into()))
}

fn granted(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.insert((
                        v.as_str().unwrap().into(),
                        g.as_str().unwrap().into(),
                        r.as_str().unwrap().into(),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn rbac_grants_exactly_the_calls_the_controller_makes() {
    let role = documents()
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "handoff-csi-driver")
        .expect("ClusterRole handoff-csi-driver");
    let granted_by_role = granted;
    let granted = granted_by_role(&role);

    // Drive every code path that talks to the API: watches, guarded patches (with a
    // conflict, so the re-read happens), annotation removal, Events.
    let fake = FakeKube::start().await;
    for n in ["node-a", "node-b"] {
        fake.put("nodes", fake_kube::node(n));
    }
    // With KubeVirt present the controller also watches VMIs and migrations, and lists
    // the pods of a claim at a second attach.
    fake.install_kubevirt();
    let kubeconfig = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    fake.write_kubeconfig(&kubeconfig);
    let d = Driver::start_with(DriverOptions {
        mode: "controller",
        extra_args: vec![
            "--attachment-store".into(),
            "kube".into(),
            "--reconcile-interval".into(),
            "1s".into(),
            // Renewed every second, so the renewal (a patch) is among the calls seen.
            "--lease-duration".into(),
            "3s".into(),
        ],
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        ..Default::default()
    })
    .await;
    let rwx =
        block_cap(handoff_csi::csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter);
    let mut c = d.controller().await;
    let id = c
        .create_volume(create_request("pv-rbac", MIB, rwx.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    fake.put("persistentvolumes", fake_kube::pv("pv-rbac", DRIVER, &id));
    fake.set_faults(Faults {
        conflicts: 1,
        ..Default::default()
    });
    for n in ["node-a", "node-b"] {
        let mut ok = false;
        for _ in 0..20 {
            if c.controller_publish_volume(publish_request(&id, n, rwx.clone()))
                .await
                .is_ok()
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "publish to {n}");
    }
    for n in ["node-a", "node-b"] {
        c.controller_unpublish_volume(handoff_csi::csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: n.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (leases, used): (BTreeSet<_>, BTreeSet<_>) = fake
        .requests()
        .iter()
        .filter_map(|(m, p, q)| rbac_of(m, p, q))
        .partition(|(_, group, _)| group == "coordination.k8s.io");
    // The driver's own lease is granted by its namespaced Role.
    let lease_role = documents()
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "handoff-csi-background-lease")
        .expect("Role handoff-csi-background-lease");
    let lease_granted = granted_by_role(&lease_role);
    assert!(
        !leases.is_empty(),
        "the controller takes its background lease"
    );
    assert_eq!(leases, lease_granted, "lease RBAC matches the calls made");
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "RBAC lacks {missing:?} (granted {granted:?})"
    );
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "RBAC grants {unused:?} the controller never uses"
    );
}
