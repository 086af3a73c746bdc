//! The node's transports together: each export goes to the transport of its data plane,
//! and a device is released by the transport that holds it.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Device, Transport, TransportError};
use crate::export::ExportInfo;
use crate::ids::VolumeId;

pub struct DataPlanes {
    file: Arc<dyn Transport>,
    nbd: Option<Arc<dyn Transport>>,
    nvme: Option<Arc<dyn Transport>>,
}

impl DataPlanes {
    pub fn new(file: Arc<dyn Transport>, nbd: Option<Arc<dyn Transport>>) -> Self {
        DataPlanes {
            file,
            nbd,
            nvme: None,
        }
    }

    /// Adds the NVMe/TCP transport.
    pub fn with_nvme(mut self, nvme: Arc<dyn Transport>) -> Self {
        self.nvme = Some(nvme);
        self
    }

    fn network(&self) -> impl Iterator<Item = &Arc<dyn Transport>> {
        self.nbd.iter().chain(self.nvme.iter())
    }

    /// The transport holding `device`.
    async fn owner(&self, device: &Device) -> Result<&Arc<dyn Transport>, TransportError> {
        for t in self.network() {
            let held = t.find_device(&device.volume_id).await?;
            if held.is_some_and(|d| d.path == device.path) {
                return Ok(t);
            }
        }
        Ok(&self.file)
    }
}

#[async_trait]
impl Transport for DataPlanes {
    async fn connect(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
        read_only: bool,
    ) -> Result<Device, TransportError> {
        match export {
            ExportInfo::LocalFile { .. } => self.file.connect(volume, export, read_only).await,
            ExportInfo::Nbd { .. } => match &self.nbd {
                Some(nbd) => nbd.connect(volume, export, read_only).await,
                None => Err(TransportError::Unsupported(export.transport_name())),
            },
            ExportInfo::NvmeTcp { .. } => match &self.nvme {
                Some(nvme) => nvme.connect(volume, export, read_only).await,
                None => Err(TransportError::Unsupported(export.transport_name())),
            },
        }
    }

    async fn find_device(&self, volume: &VolumeId) -> Result<Option<Device>, TransportError> {
        if let Some(d) = self.file.find_device(volume).await? {
            return Ok(Some(d));
        }
        for t in self.network() {
            if let Some(d) = t.find_device(volume).await? {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    async fn disconnect(&self, device: &Device) -> Result<(), TransportError> {
        self.owner(device).await?.disconnect(device).await
    }

    async fn list(&self) -> Result<Vec<Device>, TransportError> {
        let mut all = self.file.list().await?;
        for t in self.network() {
            all.extend(t.list().await?);
        }
        Ok(all)
    }

    async fn refresh_capacity(&self, device: &Device) -> Result<(), TransportError> {
        self.owner(device).await?.refresh_capacity(device).await
    }

    async fn probe(&self) -> Result<(), TransportError> {
        self.file.probe().await?;
        for t in self.network() {
            // Network planes are optional on a node: without their kernel support only
            // they are unavailable.
            if let Err(e) = t.probe().await {
                tracing::warn!(error = %e, "a network data plane is unavailable on this node");
            }
        }
        Ok(())
    }
}
