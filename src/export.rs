//! How a node reaches a volume: what the backend exports, carried to the node in
//! `publish_context`. Network transports (NVMe/TCP, NBD) add variants here.

use std::collections::HashMap;
use std::path::PathBuf;

const KEY_TRANSPORT: &str = "transport";
const KEY_PATH: &str = "imagePath";
const KEY_NBD_ADDRESS: &str = "nbdAddress";
const KEY_NBD_EXPORT: &str = "nbdExport";
const KEY_NVME_ADDRESS: &str = "nvmeAddress";
const KEY_NVME_PORT: &str = "nvmePort";
const KEY_NVME_NQN: &str = "nvmeSubsystemNqn";
const KEY_NVME_NS_UUID: &str = "nvmeNamespaceUuid";
const KEY_NVME_CTRL_LOSS_TMO: &str = "nvmeCtrlLossTmo";
const KEY_NVME_HOST_NQN: &str = "nvmeHostNqn";

/// The host NQN a target with host ACLs (nvmet) admits for `node`. Derived from the node
/// id, so the controller needs nothing from the node; the node connects as this host for
/// such exports. It names, it does not authenticate: see docs/backends.md.
pub fn node_host_nqn(node: &crate::ids::NodeId) -> String {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, node.as_str().as_bytes());
    format!("nqn.2014-08.org.nvmexpress:uuid:{id}")
}

/// The host ID that goes with a derived host NQN: one per NQN, as the kernel requires
/// (it refuses a known NQN with a different ID).
pub fn host_id_of(host_nqn: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, host_nqn.as_bytes()).to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportInfo {
    /// An image file visible on the node at this path (node-local or shared filesystem).
    LocalFile { path: PathBuf },
    /// An NBD export; `export` names this attachment and carries its secret.
    Nbd { address: String, export: String },
    /// An NVMe/TCP subsystem; the volume is the namespace with this UUID.
    NvmeTcp {
        address: String,
        port: u16,
        subsystem_nqn: String,
        namespace_uuid: String,
        /// Seconds the host keeps retrying a lost controller before failing I/O.
        ctrl_loss_tmo: u32,
        /// The host NQN the target's ACL admits for this node (nvmet); the node connects
        /// as that host. None where the target has no ACL (RDS): the node's own NQN.
        host_nqn: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("publish_context has no {0:?}: was the volume published by ControllerPublishVolume of this driver?")]
    MissingKey(&'static str),
    #[error("publish_context transport {0:?} is not supported by this node plugin")]
    UnknownTransport(String),
    #[error("publish_context {key} is not valid: {value:?}")]
    Invalid { key: &'static str, value: String },
}

impl ExportInfo {
    pub fn transport_name(&self) -> &'static str {
        match self {
            ExportInfo::LocalFile { .. } => "loop",
            ExportInfo::Nbd { .. } => "nbd",
            ExportInfo::NvmeTcp { .. } => "nvme-tcp",
        }
    }

    pub fn to_publish_context(&self) -> HashMap<String, String> {
        let mut ctx = HashMap::new();
        ctx.insert(KEY_TRANSPORT.to_owned(), self.transport_name().to_owned());
        match self {
            ExportInfo::LocalFile { path } => {
                ctx.insert(KEY_PATH.to_owned(), path.to_string_lossy().into_owned());
            }
            ExportInfo::Nbd { address, export } => {
                ctx.insert(KEY_NBD_ADDRESS.to_owned(), address.clone());
                ctx.insert(KEY_NBD_EXPORT.to_owned(), export.clone());
            }
            ExportInfo::NvmeTcp {
                address,
                port,
                subsystem_nqn,
                namespace_uuid,
                ctrl_loss_tmo,
                host_nqn,
            } => {
                if let Some(nqn) = host_nqn {
                    ctx.insert(KEY_NVME_HOST_NQN.to_owned(), nqn.clone());
                }
                ctx.insert(KEY_NVME_ADDRESS.to_owned(), address.clone());
                ctx.insert(KEY_NVME_PORT.to_owned(), port.to_string());
                ctx.insert(KEY_NVME_NQN.to_owned(), subsystem_nqn.clone());
                ctx.insert(KEY_NVME_NS_UUID.to_owned(), namespace_uuid.clone());
                ctx.insert(KEY_NVME_CTRL_LOSS_TMO.to_owned(), ctrl_loss_tmo.to_string());
            }
        }
        ctx
    }

    pub fn from_publish_context(ctx: &HashMap<String, String>) -> Result<Self, ExportError> {
        let transport = ctx
            .get(KEY_TRANSPORT)
            .ok_or(ExportError::MissingKey(KEY_TRANSPORT))?;
        match transport.as_str() {
            "loop" => Ok(ExportInfo::LocalFile {
                path: ctx
                    .get(KEY_PATH)
                    .ok_or(ExportError::MissingKey(KEY_PATH))?
                    .into(),
            }),
            "nbd" => Ok(ExportInfo::Nbd {
                address: ctx
                    .get(KEY_NBD_ADDRESS)
                    .ok_or(ExportError::MissingKey(KEY_NBD_ADDRESS))?
                    .clone(),
                export: ctx
                    .get(KEY_NBD_EXPORT)
                    .ok_or(ExportError::MissingKey(KEY_NBD_EXPORT))?
                    .clone(),
            }),
            "nvme-tcp" => {
                let get = |key: &'static str| ctx.get(key).ok_or(ExportError::MissingKey(key));
                let number = |key: &'static str| -> Result<u32, ExportError> {
                    let v = get(key)?;
                    v.parse().map_err(|_| ExportError::Invalid {
                        key,
                        value: v.chars().take(32).collect(),
                    })
                };
                let port = number(KEY_NVME_PORT)?;
                Ok(ExportInfo::NvmeTcp {
                    address: get(KEY_NVME_ADDRESS)?.clone(),
                    port: u16::try_from(port).map_err(|_| ExportError::Invalid {
                        key: KEY_NVME_PORT,
                        value: port.to_string(),
                    })?,
                    subsystem_nqn: get(KEY_NVME_NQN)?.clone(),
                    namespace_uuid: get(KEY_NVME_NS_UUID)?.clone(),
                    ctrl_loss_tmo: number(KEY_NVME_CTRL_LOSS_TMO)?,
                    host_nqn: ctx.get(KEY_NVME_HOST_NQN).cloned(),
                })
            }
            other => Err(ExportError::UnknownTransport(
                other.chars().take(32).collect(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_context_round_trip() {
        let e = ExportInfo::LocalFile {
            path: "/data/volumes/vol-x.img".into(),
        };
        assert_eq!(
            ExportInfo::from_publish_context(&e.to_publish_context()).unwrap(),
            e
        );
        assert_eq!(
            ExportInfo::from_publish_context(&HashMap::new()),
            Err(ExportError::MissingKey("transport"))
        );
        let nbd = ExportInfo::Nbd {
            address: "10.0.0.1:10809".into(),
            export: "vol-x.00".into(),
        };
        assert_eq!(
            ExportInfo::from_publish_context(&nbd.to_publish_context()).unwrap(),
            nbd
        );
        let nvme = ExportInfo::NvmeTcp {
            address: "10.0.0.2".into(),
            port: 4420,
            subsystem_nqn: "nqn.2000-02.com.mikrotik:pvc-1".into(),
            namespace_uuid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            ctrl_loss_tmo: 600,
            host_nqn: None,
        };
        assert_eq!(
            ExportInfo::from_publish_context(&nvme.to_publish_context()).unwrap(),
            nvme
        );
        let mut acl = nvme.clone();
        if let ExportInfo::NvmeTcp { host_nqn, .. } = &mut acl {
            *host_nqn = Some(node_host_nqn(&crate::ids::NodeId::parse("node-a").unwrap()));
        }
        assert_eq!(
            ExportInfo::from_publish_context(&acl.to_publish_context()).unwrap(),
            acl
        );
        let mut bad = nvme.to_publish_context();
        bad.insert("nvmePort".into(), "70000".into());
        assert!(matches!(
            ExportInfo::from_publish_context(&bad),
            Err(ExportError::Invalid { .. })
        ));
        let mut ctx = e.to_publish_context();
        ctx.insert("transport".into(), "nvme".into());
        assert!(matches!(
            ExportInfo::from_publish_context(&ctx),
            Err(ExportError::UnknownTransport(_))
        ));
    }
}
