//! CSI Identity service: who we are, what we serve, and whether we are healthy.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::backend::Backend;
use crate::csi;
use crate::csi::identity_server::Identity;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::node::lifecycle::NodeError;
use crate::node::transport::Transport;
use crate::rpc::handle;

/// What Probe checks: the pieces this process's services depend on.
pub enum HealthCheck {
    Backend(Arc<dyn Backend>),
    Transport(Arc<dyn Transport>),
}

impl HealthCheck {
    async fn check(&self) -> Result<(), Error> {
        match self {
            HealthCheck::Backend(b) => Ok(b.probe().await?),
            HealthCheck::Transport(t) => Ok(t.probe().await.map_err(NodeError::from)?),
        }
    }
}

pub struct IdentityService {
    driver_name: String,
    serves_controller: bool,
    checks: Vec<HealthCheck>,
    metrics: Metrics,
}

impl IdentityService {
    pub fn new(
        driver_name: String,
        serves_controller: bool,
        checks: Vec<HealthCheck>,
        metrics: Metrics,
    ) -> Self {
        IdentityService {
            driver_name,
            serves_controller,
            checks,
            metrics,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        handle(&self.metrics, "GetPluginInfo", "", "", async {
            Ok(csi::GetPluginInfoResponse {
                name: self.driver_name.clone(),
                vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        let service = |t: service::Type| csi::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        let mut capabilities = vec![
            service(service::Type::VolumeAccessibilityConstraints),
            csi::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        if self.serves_controller {
            capabilities.insert(0, service(service::Type::ControllerService));
        }
        handle(&self.metrics, "GetPluginCapabilities", "", "", async move {
            Ok(csi::GetPluginCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        handle(&self.metrics, "Probe", "", "", async {
            for check in &self.checks {
                check.check().await?;
            }
            Ok(csi::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}
