//! How a node reaches a volume: what the backend exports, carried to the node in
//! `publish_context`. Network transports (NVMe/TCP, NBD) add variants here.

use std::collections::HashMap;
use std::path::PathBuf;

const KEY_TRANSPORT: &str = "transport";
const KEY_PATH: &str = "imagePath";
const KEY_NBD_ADDRESS: &str = "nbdAddress";
const KEY_NBD_EXPORT: &str = "nbdExport";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportInfo {
    /// An image file visible on the node at this path (node-local or shared filesystem).
    LocalFile { path: PathBuf },
    /// An NBD export; `export` names this attachment and carries its secret.
    Nbd { address: String, export: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("publish_context has no {0:?}: was the volume published by ControllerPublishVolume of this driver?")]
    MissingKey(&'static str),
    #[error("publish_context transport {0:?} is not supported by this node plugin")]
    UnknownTransport(String),
}

impl ExportInfo {
    pub fn transport_name(&self) -> &'static str {
        match self {
            ExportInfo::LocalFile { .. } => "loop",
            ExportInfo::Nbd { .. } => "nbd",
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
        let mut ctx = e.to_publish_context();
        ctx.insert("transport".into(), "nvme".into());
        assert!(matches!(
            ExportInfo::from_publish_context(&ctx),
            Err(ExportError::UnknownTransport(_))
        ));
    }
}
