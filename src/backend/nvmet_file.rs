//! The `nvmet` backend: the `file` backend's images, exported to the nodes by the Linux
//! NVMe target of this host over TCP, one subsystem per volume, admitting only the
//! nodes the volume is published to. Run the controller on the storage host (it needs
//! that host's configfs); nodes connect with the `nvme-tcp` transport.

use std::sync::Arc;

use async_trait::async_trait;

use super::nvmet::{ConfigFs, Nvmet, NvmetError};
use super::{
    Backend, BackendError, Condition, CreateSnapshot, CreateVolume, Fencing, SnapshotRecord,
    VolumeRecord,
};
use crate::export::{node_host_nqn, ExportInfo};
use crate::ids::{NodeId, SnapshotId, VolumeId};

pub struct NvmetBackend<F: ConfigFs> {
    files: Arc<dyn Backend>,
    target: Arc<Nvmet<F>>,
}

impl From<NvmetError> for BackendError {
    fn from(e: NvmetError) -> Self {
        BackendError::Target(e.to_string())
    }
}

impl<F: ConfigFs> NvmetBackend<F> {
    /// `files` keeps the images (the `file` backend on this host's data dir).
    pub fn new(files: Arc<dyn Backend>, target: Nvmet<F>) -> Self {
        NvmetBackend {
            files,
            target: Arc::new(target),
        }
    }

    /// Configfs writes can block on the kernel (enabling a namespace opens the image).
    async fn on_target<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Nvmet<F>) -> Result<T, NvmetError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let target = self.target.clone();
        crate::blocking::run_blocking(move || f(&target))
            .await
            .map_err(BackendError::from)
    }

    fn image(&self, export: ExportInfo) -> Result<std::path::PathBuf, BackendError> {
        match export {
            ExportInfo::LocalFile { path } => Ok(path),
            other => Err(BackendError::Target(format!(
                "the image store answered with a {} export, not a local image",
                other.transport_name()
            ))),
        }
    }
}

#[async_trait]
impl<F: ConfigFs> Backend for NvmetBackend<F> {
    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeRecord, BackendError> {
        self.files.create_volume(req).await
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<(), BackendError> {
        // The export first: nvmet holds the image open while its namespace is enabled.
        let v = id.clone();
        self.on_target(move |t| t.unexport(&v)).await?;
        self.files.delete_volume(id).await
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, BackendError> {
        self.files.get_volume(id).await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, BackendError> {
        self.files.list_volumes().await
    }

    async fn expand_volume(&self, id: &VolumeId, size: u64) -> Result<VolumeRecord, BackendError> {
        let record = self.files.expand_volume(id, size).await?;
        let v = id.clone();
        self.on_target(move |t| {
            if t.is_exported(&v)? {
                t.resize(&v)?;
            }
            Ok(())
        })
        .await?;
        Ok(record)
    }

    async fn export(
        &self,
        volume: &VolumeRecord,
        node: &NodeId,
    ) -> Result<ExportInfo, BackendError> {
        let image = self.image(self.files.export(volume, node).await?)?;
        let (v, uuid, tmo) = (
            volume.id.clone(),
            volume.id.uuid(),
            volume.parameters.ctrl_loss_tmo,
        );
        let mut export = self
            .on_target(move |t| t.export(&v, &uuid, &image, tmo))
            .await?;
        // The node connects as the host the ACL admits.
        if let ExportInfo::NvmeTcp { host_nqn, .. } = &mut export {
            *host_nqn = Some(node_host_nqn(node));
        }
        Ok(export)
    }

    fn fencing(&self) -> Fencing {
        Fencing::Target
    }

    async fn allow_node(&self, volume: &VolumeRecord, node: &NodeId) -> Result<(), BackendError> {
        let (v, host) = (volume.id.clone(), node_host_nqn(node));
        self.on_target(move |t| t.allow_host(&v, &host)).await
    }

    async fn deny_node(&self, volume: &VolumeId, node: &NodeId) -> Result<(), BackendError> {
        let (v, host) = (volume.clone(), node_host_nqn(node));
        self.on_target(move |t| t.deny_host(&v, &host, true)).await
    }

    async fn condition(&self, volume: &VolumeRecord) -> Result<Condition, BackendError> {
        self.files.condition(volume).await
    }

    async fn available_capacity(&self) -> Result<u64, BackendError> {
        self.files.available_capacity().await
    }

    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotRecord, BackendError> {
        self.files.create_snapshot(req).await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
        self.files.delete_snapshot(id).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, BackendError> {
        self.files.list_snapshots().await
    }

    async fn probe(&self) -> Result<(), BackendError> {
        self.files.probe().await?;
        let target = self.target.clone();
        let available = crate::blocking::run_blocking(move || target.available())
            .await
            .map_err(|e| BackendError::Target(e.to_string()))?;
        if available {
            Ok(())
        } else {
            Err(BackendError::Target(
                "nvmet is not available in configfs: load the nvmet and nvmet-tcp modules and mount configfs at /sys/kernel/config".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::file::FileBackend;
    use super::super::nvmet::tests::{target, FakeConfigFs, PREFIX};
    use super::super::{CapacityRange, StoredCapability, MIB};
    use super::*;
    use crate::capability::AccessMode;
    use crate::ids::VolumeName;

    async fn backend() -> (tempfile::TempDir, NvmetBackend<FakeConfigFs>) {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(FileBackend::open(dir.path()).unwrap());
        let target = target();
        // nvmet is loaded: configfs has its groups.
        target
            .fs()
            .mkdir(&PathBuf::from("/cfg/nvmet/subsystems"))
            .unwrap();
        let b = NvmetBackend::new(files, target);
        b.target_ops();
        (dir, b)
    }

    fn request(params: &[(&str, &str)]) -> CreateVolume {
        CreateVolume {
            name: VolumeName::parse("pvc-a").unwrap(),
            capacity: CapacityRange {
                required: 8 * MIB,
                limit: 0,
            },
            capabilities: vec![StoredCapability {
                mode: AccessMode::MultiNodeMultiWriter,
                block: true,
            }],
            parameters: crate::params::VolumeParams::try_from(
                &params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
            .unwrap(),
            source: None,
            source_in_use: false,
        }
    }

    #[tokio::test]
    async fn publish_admits_the_node_and_unpublish_evicts_it() {
        let (_dir, b) = backend().await;
        let v = b
            .create_volume(&request(&[("nvmeCtrlLossTmo", "120")]))
            .await
            .unwrap();
        let node = NodeId::parse("node-a").unwrap();
        let host = node_host_nqn(&node);
        let export = b.export(&v, &node).await.unwrap();
        let ExportInfo::NvmeTcp {
            subsystem_nqn,
            namespace_uuid,
            ctrl_loss_tmo,
            host_nqn,
            ..
        } = export
        else {
            panic!("{export:?}")
        };
        assert_eq!(subsystem_nqn, format!("{PREFIX}{}", v.id));
        assert_eq!(namespace_uuid, v.id.uuid());
        assert_eq!(ctrl_loss_tmo, 120);
        assert_eq!(host_nqn.as_deref(), Some(host.as_str()));
        b.allow_node(&v, &node).await.unwrap();
        let sub = format!("subsystems/{subsystem_nqn}");
        let ops = b.target_ops();
        assert!(
            ops.contains(&format!("write {sub}/attr_allow_any_host=0")),
            "{ops:?}"
        );
        assert!(
            ops.contains(&format!("link {sub}/allowed_hosts/{host} -> hosts/{host}")),
            "{ops:?}"
        );
        assert_eq!(b.fencing(), Fencing::Target);
        b.deny_node(&v.id, &node).await.unwrap();
        assert_eq!(
            b.target_ops(),
            [
                format!("unlink {sub}/allowed_hosts/{host}"),
                format!("unlink ports/1/subsystems/{subsystem_nqn}"),
                format!("link ports/1/subsystems/{subsystem_nqn} -> {sub}"),
                format!("rmdir hosts/{host}"),
            ]
        );
    }

    #[tokio::test]
    async fn growth_is_revalidated_and_delete_unexports_first() {
        let (dir, b) = backend().await;
        let v = b.create_volume(&request(&[])).await.unwrap();
        // Not exported yet: growing touches only the image.
        b.expand_volume(&v.id, 16 * MIB).await.unwrap();
        assert!(b.target_ops().is_empty());
        let node = NodeId::parse("node-a").unwrap();
        b.export(&v, &node).await.unwrap();
        b.allow_node(&v, &node).await.unwrap();
        b.target_ops();
        b.expand_volume(&v.id, 32 * MIB).await.unwrap();
        let nqn = format!("{PREFIX}{}", v.id);
        assert_eq!(
            b.target_ops(),
            [format!(
                "write subsystems/{nqn}/namespaces/1/revalidate_size=1"
            )]
        );
        b.delete_volume(&v.id).await.unwrap();
        let ops = b.target_ops();
        assert_eq!(
            ops.first(),
            Some(&format!("unlink ports/1/subsystems/{nqn}"))
        );
        assert!(ops.contains(&format!("rmdir subsystems/{nqn}")), "{ops:?}");
        assert_eq!(
            ops.last(),
            Some(&format!(
                "rmdir hosts/{}",
                crate::export::node_host_nqn(&node)
            )),
            "the host entry goes once no subsystem allows it"
        );
        assert!(b.get_volume(&v.id).await.unwrap().is_none());
        assert!(std::fs::read_dir(dir.path().join("volumes"))
            .map(|d| d.count() == 0)
            .unwrap_or(true));
        // Idempotent.
        b.delete_volume(&v.id).await.unwrap();
    }

    #[tokio::test]
    async fn probe_says_when_nvmet_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(FileBackend::open(dir.path()).unwrap());
        let err = NvmetBackend::new(files, target())
            .probe()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("modules"), "{err}");
    }

    impl NvmetBackend<FakeConfigFs> {
        fn target_ops(&self) -> Vec<String> {
            self.target.fs().take()
        }
    }
}
