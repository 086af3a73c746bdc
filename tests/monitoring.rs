//! What an operator watches, checked with the real `promtool` (Debian's `prometheus`
//! package): the PrometheusRule's rules parse and pass their unit tests
//! (tests/monitoring/alerts_test.yaml: each alert fires on its series and stays quiet on
//! healthy ones), every alert has a runbook section, a running driver's /metrics passes
//! `promtool check metrics`, and every metric an alert or a dashboard panel uses is in
//! that output.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use handoff_csi::csi;
use handoff_csi::csi::volume_capability::access_mode::Mode;
use serde_yaml_ng::Value;
use support::*;

const RULES: &str = "deploy/kubernetes/optional/prometheusrule.yaml";
const DASHBOARD: &str = "deploy/grafana/handoff-csi-dashboard.json";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool() -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(
        found.status.success() && !path.is_empty(),
        "promtool is missing: install Debian's prometheus package (apt-get install prometheus)"
    );
    PathBuf::from(path)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The PrometheusRule's groups as a plain Prometheus rules file.
fn rule_groups() -> Value {
    let doc: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo(RULES)).unwrap()).unwrap();
    assert_eq!(doc["kind"], "PrometheusRule");
    doc["spec"]["groups"].clone()
}

fn alerts(groups: &Value) -> Vec<Value> {
    groups
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .collect()
}

#[test]
fn the_alert_rules_parse_and_pass_their_unit_tests() {
    let promtool = promtool();
    let dir = tempfile::tempdir().unwrap();
    let groups = rule_groups();
    let mut file = serde_yaml_ng::Mapping::new();
    file.insert("groups".into(), groups.clone());
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml_ng::to_string(&file).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        repo("tests/monitoring/alerts_test.yaml"),
        dir.path().join("alerts_test.yaml"),
    )
    .unwrap();
    let checked = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(dir.path().join("rules.yaml")));
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    run(Command::new(&promtool)
        .arg("test")
        .arg("rules")
        .arg(dir.path().join("alerts_test.yaml")));

    let tests = std::fs::read_to_string(repo("tests/monitoring/alerts_test.yaml")).unwrap();
    let runbooks = std::fs::read_to_string(repo("docs/troubleshooting.md")).unwrap();
    for rule in alerts(&groups) {
        let name = rule["alert"].as_str().unwrap();
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        let anchor = format!("#{}", name.to_lowercase());
        assert!(
            rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap()
                .ends_with(&anchor),
            "{name}'s runbook_url"
        );
        assert!(
            runbooks.contains(&format!("\n### {name}\n")),
            "docs/troubleshooting.md has no runbook section for {name}"
        );
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} has no promtool unit test"
        );
    }
}

/// Every `handoff_csi_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("handoff_csi_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_owned());
        i = end;
    }
    names
}

fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap()).unwrap();
    dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// Metric families in a scrape, with their types.
fn families(scrape: &str) -> Vec<(String, String)> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_use_is_served() {
    let promtool = promtool();
    let port = free_port();
    let nbd_port = free_port();
    let d = Driver::start_with(DriverOptions {
        extra_args: vec![
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--reconcile-interval".into(),
            "1s".into(),
            "--nbd-listen".into(),
            format!("127.0.0.1:{nbd_port}"),
        ],
        ..Default::default()
    })
    .await;
    let mut c = d.controller().await;
    // A live migration over the NBD plane, a refused third node, and the source's
    // detach (fenced at the target): every labelled family gets its series.
    let rwx = block_cap(Mode::MultiNodeMultiWriter);
    let mut req = create_request("watched", 8 << 20, rwx.clone());
    req.parameters.insert("dataPlane".into(), "nbd".into());
    let id = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    for node in ["node-a", "node-b"] {
        c.controller_publish_volume(publish_request(&id, node, rwx.clone()))
            .await
            .unwrap();
    }
    let refused = c
        .controller_publish_volume(publish_request(&id, "node-c", rwx.clone()))
        .await;
    assert_eq!(code(refused), tonic::Code::FailedPrecondition);
    // The state gauges are refreshed every --reconcile-interval.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (status, during) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, after) = http_get(port, "/metrics");

    for scrape in [&during, &after] {
        let mut lint = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        lint.stdin
            .take()
            .unwrap()
            .write_all(scrape.as_bytes())
            .unwrap();
        let out = lint.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let served: Vec<(String, String)> = families(&during)
        .into_iter()
        .chain(families(&after))
        .collect();
    let is_served = |name: &str| {
        served.iter().any(|(n, t)| {
            n == name
                || (t == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(n.as_str())))
        })
    };
    let mut used = BTreeSet::new();
    for rule in alerts(&rule_groups()) {
        used.extend(metric_names(rule["expr"].as_str().unwrap()));
    }
    for expr in dashboard_exprs() {
        used.extend(metric_names(&expr));
    }
    assert!(used.len() >= 12, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !is_served(n)).collect();
    assert!(
        missing.is_empty(),
        "used by an alert or a panel but not served: {missing:?}\n{during}"
    );
    assert!(
        during.contains("handoff_csi_attached_volumes{node=\"node-a\"} 1"),
        "{during}"
    );
    assert!(
        during.contains("handoff_csi_ready{mode=\"all\",node=\"node-a\"} 1"),
        "{during}"
    );
    assert!(
        during.contains("handoff_csi_leader{mode=\"all\",node=\"node-a\"} 1"),
        "{during}"
    );
    assert!(
        after.contains("handoff_csi_fences_total{result=\"ok\"} 1"),
        "{after}"
    );
}
