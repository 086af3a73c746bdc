//! external-attacher's resync, as kubernetes-csi/external-attacher runs it: every
//! `--reconcile-sync` period it lists the driver's volumes (ListVolumes with published
//! nodes) and, for each VolumeAttachment marked attached whose node the driver does not
//! list, marks it detached and calls ControllerPublish again. Every failed call is
//! retried per VolumeAttachment with exponential backoff, 1 s doubling to 5 min. Times
//! are scaled by `scale` so a test sees many rounds in seconds.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use handoff_csi::csi;
use handoff_csi::csi::controller_client::ControllerClient;
use tonic::transport::Channel;

use super::fake_kube::FakeKube;

pub struct AttacherSim {
    pub scale: f64,
    pub resync: Duration,
    pub driver: String,
}

/// What one VolumeAttachment saw.
#[derive(Debug, Default, Clone)]
pub struct VaHistory {
    pub calls: usize,
    pub codes: Vec<tonic::Code>,
    pub messages: Vec<String>,
}

impl AttacherSim {
    fn backoff(&self, failures: u32) -> Duration {
        let real = Duration::from_secs(1)
            .saturating_mul(1u32 << failures.min(9))
            .min(Duration::from_secs(300));
        real.mul_f64(self.scale)
    }

    /// Runs resyncs for `run_for`, publishing `cap` for every VA the driver does not
    /// list; returns what each VA (by name) saw.
    pub async fn run(
        &self,
        fake: &FakeKube,
        ctl: &mut ControllerClient<Channel>,
        volume_of_pv: impl Fn(&str) -> Option<String>,
        cap: csi::VolumeCapability,
        run_for: Duration,
    ) -> HashMap<String, VaHistory> {
        let deadline = tokio::time::Instant::now() + run_for;
        let mut history: HashMap<String, VaHistory> = HashMap::new();
        let mut next_try: HashMap<String, (tokio::time::Instant, u32)> = HashMap::new();
        let mut next_resync = tokio::time::Instant::now();
        while tokio::time::Instant::now() < deadline {
            let now = tokio::time::Instant::now();
            if now >= next_resync {
                next_resync = now + self.resync.mul_f64(self.scale);
                let listed = ctl
                    .list_volumes(csi::ListVolumesRequest::default())
                    .await
                    .expect("ListVolumes")
                    .into_inner();
                let published: HashMap<String, Vec<String>> = listed
                    .entries
                    .into_iter()
                    .filter_map(|e| {
                        let v = e.volume?;
                        Some((
                            v.volume_id,
                            e.status.map(|s| s.published_node_ids).unwrap_or_default(),
                        ))
                    })
                    .collect();
                for va in fake.list("volumeattachments") {
                    if va["spec"]["attacher"] != self.driver.as_str()
                        || va["status"]["attached"] != true
                    {
                        continue;
                    }
                    let name = va["metadata"]["name"].as_str().unwrap().to_owned();
                    let node = va["spec"]["nodeName"].as_str().unwrap().to_owned();
                    let pv = va["spec"]["source"]["persistentVolumeName"]
                        .as_str()
                        .unwrap();
                    let Some(volume) = volume_of_pv(pv) else {
                        continue;
                    };
                    if !published.get(&volume).is_some_and(|n| n.contains(&node)) {
                        // Resync: the driver does not list it, so it is attached again.
                        let mut va = va.clone();
                        va["status"]["attached"] = serde_json::json!(false);
                        fake.put("volumeattachments", va);
                        next_try.entry(name).or_insert((now, 0));
                    }
                }
            }
            for va in fake.list("volumeattachments") {
                let name = va["metadata"]["name"].as_str().unwrap().to_owned();
                let Some((when, failures)) = next_try.get(&name).copied() else {
                    continue;
                };
                if tokio::time::Instant::now() < when {
                    continue;
                }
                let node = va["spec"]["nodeName"].as_str().unwrap().to_owned();
                let pv = va["spec"]["source"]["persistentVolumeName"]
                    .as_str()
                    .unwrap();
                let Some(volume) = volume_of_pv(pv) else {
                    continue;
                };
                let r = ctl
                    .controller_publish_volume(super::publish_request(&volume, &node, cap.clone()))
                    .await;
                let h = history.entry(name.clone()).or_default();
                h.calls += 1;
                match r {
                    Ok(_) => {
                        h.codes.push(tonic::Code::Ok);
                        let mut va = va.clone();
                        va["status"]["attached"] = serde_json::json!(true);
                        fake.put("volumeattachments", va);
                        next_try.remove(&name);
                    }
                    Err(e) => {
                        h.codes.push(e.code());
                        h.messages.push(e.message().to_owned());
                        next_try.insert(
                            name,
                            (
                                tokio::time::Instant::now() + self.backoff(failures),
                                failures + 1,
                            ),
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        history
    }
}
