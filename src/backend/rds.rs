//! The `rds` backend: volumes on a MikroTik RouterOS storage server (RDS), made with
//! `/disk` commands over SSH and exported by RouterOS over NVMe/TCP. Compatible with the
//! Go driver's volumes (`pvc-<uuid>` slots, `nqn.2000-02.com.mikrotik:` NQNs), which are
//! adopted as they are. The driver's record of a volume (name, capabilities,
//! parameters, exact size) lives in the disk's comment; RouterOS itself only knows
//! the file and its rounded size.
//!
//! Fencing is RouterOS's own: each disk's `nvme-tcp-server-allow-host-name` lists the
//! host NQNs that may connect (every node connects with its own, derived from its node
//! id); a node losing the volume is taken off the list and the export is cycled, which
//! drops its live connection. A new disk admits no host until a node is published.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::routeros::{self, DiskSpec, RosError};
use super::ssh::{CommandShell, ShellError};
use super::{
    Backend, BackendError, Condition, ContentSource, CreateSnapshot, CreateVolume, Fencing,
    SnapshotRecord, StoredCapability, VolumeRecord,
};
use crate::capability::AccessMode;
use crate::export::{node_host_nqn, ExportInfo};
use crate::ids::{NodeId, SnapshotId, VolumeId};
use crate::params::VolumeParams;

/// Comments the driver wrote first: this, then hex-encoded JSON (still read).
const META_PREFIX: &str = "handoff1:";
/// Comments the driver writes now: this, then unpadded base64url JSON — two thirds the
/// size of hex, one word without `=` or spaces, so a console that wraps it can be read
/// back by joining the lines.
const META_PREFIX_V2: &str = "handoff2:";

#[derive(Debug, Clone)]
pub struct RdsSettings {
    /// Directory of the images on the router, e.g. `/nvme1/volumes`; its first component
    /// is the disk whose free space GetCapacity reports.
    pub volume_dir: String,
    /// Address the nodes connect to over NVMe/TCP (often not the SSH address).
    pub nvme_address: String,
    pub nvme_port: u16,
    /// Attempts per command for transient failures (busy router, dropped session).
    pub attempts: u32,
    pub backoff: Duration,
}

impl RdsSettings {
    fn pool_slot(&self) -> &str {
        self.volume_dir
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
    }
}

/// What the driver keeps in a disk's comment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
enum Meta {
    Volume {
        name: String,
        size: u64,
        caps: Vec<StoredCapability>,
        #[serde(default)]
        params: VolumeParams,
        created: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<ContentSource>,
    },
    Snapshot {
        name: String,
        size: u64,
        source: VolumeId,
        created: DateTime<Utc>,
    },
}

impl Meta {
    fn encode(&self) -> String {
        use base64::Engine;
        let json = serde_json::to_vec(self).expect("metadata serialises");
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        format!("{META_PREFIX_V2}{text}")
    }

    fn decode(comment: &str) -> Option<Meta> {
        use base64::Engine;
        if let Some(text) = comment.strip_prefix(META_PREFIX_V2) {
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text)
                .ok()?;
            return serde_json::from_slice(&json).ok();
        }
        let hex = comment.strip_prefix(META_PREFIX)?;
        if hex.len() % 2 != 0 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
        serde_json::from_slice(&bytes?).ok()
    }
}

/// One `/disk` entry as printed.
#[derive(Debug, Clone)]
struct Disk {
    slot: String,
    file_path: String,
    size: u64,
    exported: bool,
    /// RouterOS's `status` (`ready` when usable), when it prints one.
    status: Option<String>,
    nqn: Option<String>,
    port: Option<u16>,
    /// Hosts admitted to the export; `None`: any host (an empty list).
    allowed: Option<Vec<String>>,
    meta: Option<Meta>,
}

impl Disk {
    fn from_fields(f: &BTreeMap<String, String>) -> Option<Disk> {
        if f.get("type").map(String::as_str) != Some("file") {
            return None;
        }
        let size = f
            .get("file-size")
            .or(f.get("size"))
            .and_then(|s| routeros::parse_size(s))
            .unwrap_or(0);
        Some(Disk {
            slot: f.get("slot")?.clone(),
            file_path: f.get("file-path").cloned().unwrap_or_default(),
            size,
            exported: f.get("nvme-tcp-export").map(String::as_str) == Some("yes"),
            status: f.get("status").cloned(),
            nqn: f.get("nvme-tcp-server-nqn").cloned(),
            port: f.get("nvme-tcp-server-port").and_then(|p| p.parse().ok()),
            allowed: routeros::allowed_hosts(
                f.get("nvme-tcp-server-allow-host-name")
                    .map_or("", String::as_str),
            ),
            meta: f.get("comment").and_then(|c| Meta::decode(c)),
        })
    }

    /// The volume this disk is, if it is one. A disk without our record was made by the
    /// Go driver (or by hand): adopted as a block volume any mode may use.
    fn volume(&self) -> Option<VolumeRecord> {
        let id = VolumeId::parse(&self.slot).ok()?;
        Some(match &self.meta {
            Some(Meta::Volume {
                name,
                size,
                caps,
                params,
                created,
                source,
            }) => VolumeRecord {
                id,
                name: name.clone(),
                capacity_bytes: *size,
                capabilities: caps.clone(),
                parameters: params.clone(),
                created_at: *created,
                source: source.clone(),
            },
            _ => VolumeRecord {
                name: self.slot.clone(),
                id,
                capacity_bytes: self.size,
                capabilities: adopted_capabilities(),
                parameters: VolumeParams::default(),
                created_at: DateTime::UNIX_EPOCH,
                source: None,
            },
        })
    }

    fn snapshot(&self) -> Option<SnapshotRecord> {
        let id = SnapshotId::parse(&self.slot).ok()?;
        if self.meta.is_none() {
            return go_driver_snapshot(id, self.size);
        }
        match &self.meta {
            Some(Meta::Snapshot {
                name,
                size,
                source,
                created,
            }) => Some(SnapshotRecord {
                id,
                name: name.clone(),
                source_volume: source.clone(),
                size_bytes: *size,
                created_at: *created,
            }),
            _ => None,
        }
    }
}

/// A snapshot the Go driver made: slot `snap-<source uuid>-at-<unix time>`, no comment;
/// its source is the `pvc-<uuid>` volume and its size the file's.
fn go_driver_snapshot(id: SnapshotId, size: u64) -> Option<SnapshotRecord> {
    let rest = id.as_str().strip_prefix("snap-")?;
    let (uuid, at) = rest.split_once("-at-")?;
    let source = VolumeId::parse(&format!("pvc-{uuid}")).ok()?;
    // Decimal seconds as the Go driver writes them; hex as older builds did.
    let secs = at
        .parse::<i64>()
        .ok()
        .or_else(|| i64::from_str_radix(at, 16).ok())?;
    Some(SnapshotRecord {
        name: id.as_str().to_owned(),
        id,
        source_volume: source,
        size_bytes: size,
        created_at: DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::UNIX_EPOCH),
    })
}

/// The Go driver served raw block volumes, single- or multi-node (live migration), and
/// single-node filesystems.
fn adopted_capabilities() -> Vec<StoredCapability> {
    [
        AccessMode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly,
        AccessMode::MultiNodeMultiWriter,
    ]
    .into_iter()
    .map(|mode| StoredCapability { mode, block: true })
    // Its filesystem volumes were single-node.
    .chain(std::iter::once(StoredCapability {
        mode: AccessMode::SingleNodeWriter,
        block: false,
    }))
    .collect()
}

#[derive(Debug)]
enum RunError {
    Shell(ShellError),
    Ros(RosError),
}

impl RunError {
    /// The backend error, with `no_space` for a full router.
    fn into_backend(self, no_space: impl FnOnce() -> BackendError) -> BackendError {
        match self {
            RunError::Ros(RosError::NoSpace(_)) => no_space(),
            RunError::Ros(e @ RosError::Other(_)) => BackendError::Target(e.to_string()),
            RunError::Ros(e) => BackendError::TargetRefused(e.to_string()),
            RunError::Shell(e) if e.transient() => BackendError::Target(e.to_string()),
            RunError::Shell(e) => BackendError::TargetRefused(e.to_string()),
        }
    }
}

pub struct RdsBackend {
    shell: Arc<dyn CommandShell>,
    settings: RdsSettings,
}

impl RdsBackend {
    pub fn new(shell: Arc<dyn CommandShell>, settings: RdsSettings) -> Self {
        RdsBackend { shell, settings }
    }

    /// Runs one command, again after transient failures only: never after "not enough
    /// space", a syntax error, a missing item, or a refused login or host key.
    async fn run(&self, command: &str) -> Result<String, RunError> {
        let attempts = self.settings.attempts.max(1);
        let mut attempt = 1;
        loop {
            let error = match self.shell.run(command).await {
                Ok(out) => match routeros::check_output(&out) {
                    Ok(()) => return Ok(out),
                    Err(e) if e.retryable() => RunError::Ros(e),
                    Err(e) => return Err(RunError::Ros(e)),
                },
                Err(e) if e.transient() => RunError::Shell(e),
                Err(e) => return Err(RunError::Shell(e)),
            };
            if attempt >= attempts {
                return Err(error);
            }
            tracing::warn!(attempt, command = %verb(command), error = ?error, "RouterOS command failed; retrying");
            tokio::time::sleep(self.settings.backoff * attempt).await;
            attempt += 1;
        }
    }

    async fn run_or(&self, command: Result<String, RosError>) -> Result<String, BackendError> {
        let command = command.map_err(|e| BackendError::TargetRefused(e.to_string()))?;
        self.run(&command)
            .await
            .map_err(|e| e.into_backend(|| BackendError::Target("not enough space".into())))
    }

    async fn disks(&self) -> Result<Vec<Disk>, BackendError> {
        let out = self.run_or(Ok(routeros::LIST.to_owned())).await?;
        Ok(routeros::parse_detail(&out)
            .iter()
            .filter_map(Disk::from_fields)
            .collect())
    }

    async fn disk(&self, slot: &str) -> Result<Option<Disk>, BackendError> {
        let out = self.run_or(routeros::show(slot)).await?;
        Ok(routeros::parse_detail(&out)
            .iter()
            .filter_map(Disk::from_fields)
            .find(|d| d.slot == slot))
    }

    fn spec<'a>(&'a self, slot: &'a str, size: u64, comment: &'a str) -> DiskSpec<'a> {
        DiskSpec {
            slot,
            dir: &self.settings.volume_dir,
            size,
            nvme_port: self.settings.nvme_port,
            comment,
        }
    }

    /// The id a CreateVolume name maps to: the name itself when it is a PV name
    /// (`pvc-<uuid>`, as the Go driver did), else the id already made for that name.
    async fn id_for(&self, name: &str) -> Result<VolumeId, BackendError> {
        if let Ok(id) = VolumeId::parse(name) {
            return Ok(id);
        }
        let existing = self.disks().await?.into_iter().find_map(|d| {
            d.volume()
                .filter(|v| v.name == name && d.meta.is_some())
                .map(|v| v.id)
        });
        Ok(existing.unwrap_or_else(VolumeId::generate))
    }

    /// Removes a disk and its file, wherever the disk says the file is (the default path
    /// when the disk is gone already, for a file left behind).
    async fn remove(&self, slot: &str) -> Result<(), BackendError> {
        let file_path = match self.disk(slot).await? {
            Some(d) if !d.file_path.is_empty() => d.file_path,
            _ => self.spec(slot, 0, "").file_path(),
        };
        for command in routeros::remove(slot, &file_path)
            .map_err(|e| BackendError::TargetRefused(e.to_string()))?
        {
            match self.run(&command).await {
                // Gone already: delete is idempotent.
                Ok(_) | Err(RunError::Ros(RosError::NotFound(_))) => {}
                Err(e) => return Err(e.into_backend(|| BackendError::Target("remove".into()))),
            }
        }
        Ok(())
    }
}

impl RdsBackend {
    /// Reads the allow list back: a fence (or a grant) counts only when RouterOS shows it.
    async fn confirm_allowed(
        &self,
        slot: &str,
        node: &NodeId,
        want: bool,
    ) -> Result<(), BackendError> {
        let host = node_host_nqn(node);
        let disk = self.disk(slot).await?;
        let admitted = match disk.as_ref().map(|d| &d.allowed) {
            None => false,
            Some(None) => true,
            Some(Some(list)) => list.contains(&host),
        };
        if admitted == want {
            Ok(())
        } else {
            Err(BackendError::Target(format!(
                "RouterOS accepted the allow list of disk {slot} but does not show node {node} {}",
                if want { "admitted" } else { "removed" }
            )))
        }
    }
}

/// The command's first words, for logs (never the values).
fn verb(command: &str) -> String {
    command
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[async_trait]
impl Backend for RdsBackend {
    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeRecord, BackendError> {
        let id = self.id_for(req.name.as_str()).await?;
        if let Some(existing) = self.disk(id.as_str()).await?.and_then(|d| d.volume()) {
            return existing.reuse_for(req);
        }
        let size = req.capacity.resolve()?;
        let source_disk = match &req.source {
            None => None,
            Some(ContentSource::Snapshot(s)) => Some(
                self.disk(s.as_str())
                    .await?
                    .filter(|d| d.snapshot().is_some())
                    .ok_or_else(|| BackendError::SnapshotNotFound(s.clone()))?,
            ),
            Some(ContentSource::Volume(v)) => Some(
                self.disk(v.as_str())
                    .await?
                    .ok_or_else(|| BackendError::NotFound(v.clone()))?,
            ),
        };
        let source_size = source_disk.as_ref().map(|d| match &d.meta {
            Some(Meta::Volume { size, .. } | Meta::Snapshot { size, .. }) => *size,
            None => d.size,
        });
        if let Some(source_size) = source_size.filter(|s| *s > size) {
            return Err(BackendError::SmallerThanSource {
                requested: size,
                source_size,
            });
        }
        let meta = Meta::Volume {
            name: req.name.to_string(),
            size,
            caps: req.capabilities.clone(),
            params: req.parameters.clone(),
            created: Utc::now(),
            source: req.source.clone(),
        }
        .encode();
        let spec = self.spec(id.as_str(), size, &meta);
        let command = match &source_disk {
            None => spec.create(),
            Some(src) => spec.copy_from(&src.slot),
        };
        let no_space = || BackendError::NoSpace(id.clone());
        let added = match command {
            Ok(c) => self.run(&c).await,
            Err(e) => return Err(BackendError::TargetRefused(e.to_string())),
        };
        if let Err(e) = added {
            // A retried add may have landed on an earlier attempt.
            match self.disk(id.as_str()).await?.and_then(|d| d.volume()) {
                Some(v) if v.incompatibility(req).is_none() => return Ok(v),
                _ => return Err(e.into_backend(no_space)),
            }
        }
        self.disk(id.as_str())
            .await?
            .and_then(|d| d.volume())
            .ok_or_else(|| {
                BackendError::Target(format!(
                    "RouterOS accepted /disk add for {id} but does not list the disk"
                ))
            })
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<(), BackendError> {
        self.remove(id.as_str()).await
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, BackendError> {
        Ok(self.disk(id.as_str()).await?.and_then(|d| d.volume()))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, BackendError> {
        let mut volumes: Vec<VolumeRecord> = self
            .disks()
            .await?
            .iter()
            .filter_map(Disk::volume)
            .collect();
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    async fn expand_volume(&self, id: &VolumeId, size: u64) -> Result<VolumeRecord, BackendError> {
        let disk = self
            .disk(id.as_str())
            .await?
            .ok_or_else(|| BackendError::NotFound(id.clone()))?;
        let mut record = disk
            .volume()
            .ok_or_else(|| BackendError::NotFound(id.clone()))?;
        if size < record.capacity_bytes {
            return Err(BackendError::Shrink {
                volume: id.clone(),
                current: record.capacity_bytes,
                requested: size,
            });
        }
        if size == record.capacity_bytes {
            return Ok(record);
        }
        // Adopted disks keep no comment: they get one now, with the exact size.
        let meta = Meta::Volume {
            name: record.name.clone(),
            size,
            caps: record.capabilities.clone(),
            params: record.parameters.clone(),
            created: record.created_at,
            source: record.source.clone(),
        }
        .encode();
        let command = routeros::resize(id.as_str(), size, &meta)
            .map_err(|e| BackendError::TargetRefused(e.to_string()))?;
        self.run(&command)
            .await
            .map_err(|e| e.into_backend(|| BackendError::NoSpace(id.clone())))?;
        record.capacity_bytes = size;
        Ok(record)
    }

    async fn export(
        &self,
        volume: &VolumeRecord,
        node: &NodeId,
    ) -> Result<ExportInfo, BackendError> {
        let disk = self
            .disk(volume.id.as_str())
            .await?
            .ok_or_else(|| BackendError::NotFound(volume.id.clone()))?;
        if !disk.exported {
            return Err(BackendError::TargetRefused(format!(
                "disk {} is not exported over NVMe/TCP on the router (nvme-tcp-export=no); enable it with /disk set",
                volume.id
            )));
        }
        Ok(ExportInfo::NvmeTcp {
            address: self.settings.nvme_address.clone(),
            port: disk.port.unwrap_or(self.settings.nvme_port),
            subsystem_nqn: disk
                .nqn
                .unwrap_or_else(|| format!("{}{}", routeros::NQN_PREFIX, volume.id)),
            // RouterOS does not print its namespaces' UUIDs: the node takes the
            // subsystem's one namespace.
            namespace_uuid: String::new(),
            ctrl_loss_tmo: volume.parameters.ctrl_loss_tmo,
            // The name the export admits it by (allow_node).
            host_nqn: Some(node_host_nqn(node)),
        })
    }

    fn fencing(&self) -> Fencing {
        Fencing::Target
    }

    /// Adds the node's host NQN to the disk's allow list (a disk that admitted any host
    /// — the Go driver's — admits only the nodes published from now on).
    async fn allow_node(&self, volume: &VolumeRecord, node: &NodeId) -> Result<(), BackendError> {
        let disk = self
            .disk(volume.id.as_str())
            .await?
            .ok_or_else(|| BackendError::NotFound(volume.id.clone()))?;
        let host = node_host_nqn(node);
        let mut hosts = disk.allowed.clone().unwrap_or_default();
        if disk.allowed.is_some() && hosts.contains(&host) {
            return Ok(());
        }
        hosts.push(host);
        self.run_or(routeros::allow_hosts(volume.id.as_str(), &hosts))
            .await?;
        self.confirm_allowed(volume.id.as_str(), node, true).await
    }

    /// Takes the node off the allow list, then cycles the export so its live connection
    /// drops (the nodes still allowed reconnect). Fails closed: the fence is confirmed
    /// only when RouterOS prints the list without the node, and the export is cycled on
    /// every call — a retry after a failure mid-way (list changed, connection still up)
    /// must still cut the connection, and leaves the export on for the others.
    async fn deny_node(&self, volume: &VolumeId, node: &NodeId) -> Result<(), BackendError> {
        let Some(disk) = self.disk(volume.as_str()).await? else {
            // No disk, no export: nothing can reach it.
            return Ok(());
        };
        let host = node_host_nqn(node);
        let hosts: Vec<String> = match &disk.allowed {
            Some(list) => list.iter().filter(|h| **h != host).cloned().collect(),
            // Any host was admitted: from now on only nobody, until a node is published.
            None => Vec::new(),
        };
        if disk.allowed.as_ref() != Some(&hosts) {
            self.run_or(routeros::allow_hosts(volume.as_str(), &hosts))
                .await?;
        }
        self.confirm_allowed(volume.as_str(), node, false).await?;
        let [off, on] = routeros::cycle_export(volume.as_str())
            .map_err(|e| BackendError::TargetRefused(e.to_string()))?;
        if disk.exported {
            self.run_or(Ok(off)).await?;
        }
        self.run_or(Ok(on)).await?;
        Ok(())
    }

    async fn condition(&self, volume: &VolumeRecord) -> Result<Condition, BackendError> {
        Ok(match self.disk(volume.id.as_str()).await? {
            None => Condition {
                abnormal: true,
                message: format!("disk {} is gone from the router", volume.id),
            },
            Some(d) if !d.exported => Condition {
                abnormal: true,
                message: format!("disk {} is no longer exported over NVMe/TCP", volume.id),
            },
            Some(Disk {
                status: Some(s), ..
            }) if s != "ready" => Condition {
                abnormal: true,
                message: format!("the router reports disk {} as {s:?}", volume.id),
            },
            Some(_) => Condition {
                abnormal: false,
                message: "disk present and exported".into(),
            },
        })
    }

    async fn available_capacity(&self) -> Result<u64, BackendError> {
        let pool = self.settings.pool_slot();
        let out = self.run_or(routeros::capacity(pool)).await?;
        routeros::parse_detail(&out)
            .iter()
            .find_map(|f| f.get("free"))
            .and_then(|free| routeros::parse_size(free))
            .ok_or_else(|| {
                BackendError::Target(format!(
                    "the router does not report the free space of the disk mounted at {pool:?} (the first component of --rds-volume-dir)"
                ))
            })
    }

    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotRecord, BackendError> {
        let disks = self.disks().await?;
        if let Some(existing) = disks
            .iter()
            .filter_map(Disk::snapshot)
            .find(|s| s.name == req.name.as_str())
        {
            return existing.reuse_for(req);
        }
        let source = disks
            .iter()
            .find(|d| d.slot == req.source.as_str())
            .ok_or_else(|| BackendError::NotFound(req.source.clone()))?;
        let size = source.volume().map_or(source.size, |v| v.capacity_bytes);
        let id = SnapshotId::generate();
        let meta = Meta::Snapshot {
            name: req.name.to_string(),
            size,
            source: req.source.clone(),
            created: Utc::now(),
        };
        let encoded = meta.encode();
        let command = self
            .spec(id.as_str(), size, &encoded)
            .snapshot_of(&source.slot)
            .map_err(|e| BackendError::TargetRefused(e.to_string()))?;
        self.run(&command)
            .await
            .map_err(|e| e.into_backend(|| BackendError::NoSpace(req.source.clone())))?;
        let Meta::Snapshot { created, .. } = meta else {
            unreachable!()
        };
        Ok(SnapshotRecord {
            id,
            name: req.name.to_string(),
            source_volume: req.source.clone(),
            size_bytes: size,
            created_at: created,
        })
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
        self.remove(id.as_str()).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, BackendError> {
        let mut snaps: Vec<SnapshotRecord> = self
            .disks()
            .await?
            .iter()
            .filter_map(Disk::snapshot)
            .collect();
        snaps.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(snaps)
    }

    async fn probe(&self) -> Result<(), BackendError> {
        self.run_or(Ok(routeros::PROBE.to_owned())).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_a_comment() {
        let m = Meta::Snapshot {
            name: "snap-of-a".into(),
            size: 10 << 20,
            source: VolumeId::generate(),
            created: Utc::now(),
        };
        let c = m.encode();
        assert!(c.starts_with(META_PREFIX_V2));
        assert!(c[META_PREFIX_V2.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Meta::decode(&c), Some(m.clone()));
        // Records written before stay readable.
        let json = serde_json::to_vec(&m).unwrap();
        let hex: String = json.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            c.len() < hex.len() * 3 / 4 + 16,
            "base64 is two thirds of hex"
        );
        assert_eq!(Meta::decode(&format!("{META_PREFIX}{hex}")), Some(m));
        for junk in ["", "handoff1:zz", "handoff1:7", "a comment by an admin"] {
            assert_eq!(Meta::decode(junk), None, "{junk}");
        }
    }

    /// Issue 16 point 14: the Go driver's snapshots are adopted.
    #[test]
    fn go_driver_snapshots_are_adopted() {
        let f: BTreeMap<String, String> = [
            ("type", "file"),
            (
                "slot",
                "snap-3c6f1a2b-1111-4222-8333-944455556666-at-1764547200",
            ),
            (
                "file-path",
                "/nvme1/snap-3c6f1a2b-1111-4222-8333-944455556666-at-1764547200.img",
            ),
            ("file-size", "20.0GiB"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let s = Disk::from_fields(&f).unwrap().snapshot().expect("adopted");
        assert_eq!(
            s.source_volume.as_str(),
            "pvc-3c6f1a2b-1111-4222-8333-944455556666"
        );
        assert_eq!(s.size_bytes, 20 << 30);
        assert_eq!(s.created_at.timestamp(), 1_764_547_200);
        assert!(SnapshotId::parse("snap-3c6f1a2b-1111-4222-8333-944455556666-at-x").is_err());
        assert!(SnapshotId::parse("snap-not-a-uuid-at-1").is_err());
    }

    #[test]
    fn disks_without_our_record_are_adopted_as_block_volumes() {
        let f: BTreeMap<String, String> = [
            ("type", "file"),
            ("slot", "pvc-3c6f1a2b-1111-4222-8333-944455556666"),
            (
                "file-path",
                "/nvme1/pvc-3c6f1a2b-1111-4222-8333-944455556666.img",
            ),
            ("file-size", "20.0GiB"),
            ("nvme-tcp-export", "yes"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let v = Disk::from_fields(&f).unwrap().volume().unwrap();
        assert_eq!(v.capacity_bytes, 20 << 30);
        assert_eq!(v.name, "pvc-3c6f1a2b-1111-4222-8333-944455556666");
        // Multi-node only as raw block (live migration); filesystems single-node.
        assert!(v
            .capabilities
            .iter()
            .any(|c| c.mode == AccessMode::MultiNodeMultiWriter && c.block));
        assert!(v
            .capabilities
            .iter()
            .filter(|c| !c.block)
            .all(|c| c.mode == AccessMode::SingleNodeWriter));
        // Hardware disks and foreign slots are not volumes.
        let mut hw = f.clone();
        hw.insert("type".into(), "hardware".into());
        assert!(Disk::from_fields(&hw).is_none());
        let mut foreign = f;
        foreign.insert("slot".into(), "backup-disk".into());
        assert!(Disk::from_fields(&foreign).unwrap().volume().is_none());
    }
}
