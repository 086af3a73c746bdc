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
}

impl DataPlanes {
    pub fn new(file: Arc<dyn Transport>, nbd: Option<Arc<dyn Transport>>) -> Self {
        DataPlanes { file, nbd }
    }

    /// The transport holding `device`.
    async fn owner(&self, device: &Device) -> Result<&Arc<dyn Transport>, TransportError> {
        if let Some(nbd) = &self.nbd {
            let held = nbd.find_device(&device.volume_id).await?;
            if held.is_some_and(|d| d.path == device.path) {
                return Ok(nbd);
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
        }
    }

    async fn find_device(&self, volume: &VolumeId) -> Result<Option<Device>, TransportError> {
        if let Some(d) = self.file.find_device(volume).await? {
            return Ok(Some(d));
        }
        match &self.nbd {
            Some(nbd) => nbd.find_device(volume).await,
            None => Ok(None),
        }
    }

    async fn disconnect(&self, device: &Device) -> Result<(), TransportError> {
        self.owner(device).await?.disconnect(device).await
    }

    async fn list(&self) -> Result<Vec<Device>, TransportError> {
        let mut all = self.file.list().await?;
        if let Some(nbd) = &self.nbd {
            all.extend(nbd.list().await?);
        }
        Ok(all)
    }

    async fn refresh_capacity(&self, device: &Device) -> Result<(), TransportError> {
        self.owner(device).await?.refresh_capacity(device).await
    }

    async fn probe(&self) -> Result<(), TransportError> {
        self.file.probe().await?;
        if let Some(nbd) = &self.nbd {
            // The NBD plane is optional on a node: without FUSE only it is unavailable.
            if let Err(e) = nbd.probe().await {
                tracing::warn!(error = %e, "NBD data plane unavailable on this node");
            }
        }
        Ok(())
    }
}
