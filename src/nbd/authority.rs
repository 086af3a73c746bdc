//! Who may connect to which export: a node holding a current attachment, proven by a
//! per-attachment secret in the export name. The secret is an HMAC of the attachment
//! (volume, node, attach time) under the controller's key, so nothing secret is stored
//! in the attachment state, a re-publish returns the same publish_context, and a new
//! attachment gets a new secret.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::server::{ExportAuthority, Grant, Refusal};
use crate::attachment::store::AttachmentStore;
use crate::backend::Backend;
use crate::export::ExportInfo;
use crate::ids::{NodeId, VolumeId};

type HmacSha256 = Hmac<Sha256>;
const KEY_LEN: usize = 32;
const TOKEN_HEX: usize = 64;

/// The controller's export-signing key (32 random bytes, file mode 0600). Replicas that
/// may serve the same exports share it (a mounted Secret).
pub struct ExportKey([u8; KEY_LEN]);

impl std::fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportKey(..)")
    }
}

impl ExportKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        ExportKey(bytes)
    }

    pub fn generate() -> Self {
        let mut b = [0u8; KEY_LEN];
        b[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        b[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        ExportKey(b)
    }

    /// Reads the key, creating it (0600, exclusively) when the file does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::read(path) {
            Ok(b) => {
                let bytes: [u8; KEY_LEN] = b.as_slice().try_into().map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} must hold exactly {KEY_LEN} bytes", path.display()),
                    )
                })?;
                Ok(ExportKey(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                f.write_all(&key.0)?;
                f.sync_all()?;
                Ok(key)
            }
            Err(e) => Err(e),
        }
    }

    fn mac(&self, volume: &VolumeId, node: &NodeId, attached_at: DateTime<Utc>) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(volume.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(node.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(
            &attached_at
                .timestamp_nanos_opt()
                .unwrap_or_default()
                .to_be_bytes(),
        );
        mac
    }

    /// Reads an existing key (a target on another host must use the controller's).
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let b = std::fs::read(path)?;
        let bytes: [u8; KEY_LEN] = b.as_slice().try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold exactly {KEY_LEN} bytes", path.display()),
            )
        })?;
        Ok(ExportKey(bytes))
    }

    fn fence_mac(&self, volume: &VolumeId, node: &NodeId) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"fence\0");
        mac.update(volume.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(node.as_str().as_bytes());
        mac
    }

    /// Proves a fence request comes from a holder of the key (the controller).
    pub fn fence_token(&self, volume: &VolumeId, node: &NodeId) -> String {
        hex(&self.fence_mac(volume, node).finalize().into_bytes())
    }

    pub fn verify_fence(&self, volume: &VolumeId, node: &NodeId, token: &str) -> bool {
        unhex(token).is_some_and(|tag| self.fence_mac(volume, node).verify_slice(&tag).is_ok())
    }

    /// The export name a node uses for this attachment: `<volume id>.<64 hex>`.
    pub fn export_name(&self, volume: &VolumeId, node: &NodeId, at: DateTime<Utc>) -> String {
        let tag = self.mac(volume, node, at).finalize().into_bytes();
        format!("{volume}.{}", hex(&tag))
    }

    fn verify(&self, volume: &VolumeId, node: &NodeId, at: DateTime<Utc>, tag: &[u8]) -> bool {
        // Constant-time comparison.
        self.mac(volume, node, at).verify_slice(tag).is_ok()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex digits → 32 bytes; anything else → None.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != TOKEN_HEX || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..TOKEN_HEX)
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// `<volume id>.<64 hex>` → (volume, tag); anything else is not an export of ours.
fn parse_export_name(name: &str) -> Option<(VolumeId, Vec<u8>)> {
    let (volume, tag) = name.split_once('.')?;
    let tag = unhex(tag)?;
    Some((VolumeId::parse(volume).ok()?, tag))
}

/// Authorises against the attachment store (the state the controller persists; read
/// only here) and the backend's images.
pub struct AttachmentAuthority {
    attachments: Arc<dyn AttachmentStore>,
    backend: Arc<dyn Backend>,
    key: Arc<ExportKey>,
}

impl AttachmentAuthority {
    pub fn new(
        attachments: Arc<dyn AttachmentStore>,
        backend: Arc<dyn Backend>,
        key: Arc<ExportKey>,
    ) -> Self {
        AttachmentAuthority {
            attachments,
            backend,
            key,
        }
    }
}

#[async_trait]
impl ExportAuthority for AttachmentAuthority {
    async fn authorize(&self, export_name: &str) -> Result<Grant, Refusal> {
        let (volume, tag) = parse_export_name(export_name).ok_or(Refusal::Unknown)?;
        let record = self
            .backend
            .get_volume(&volume)
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?
            .ok_or(Refusal::Unknown)?;
        let state = self
            .attachments
            .load(&volume)
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?
            .ok_or(Refusal::Denied)?;
        let holder = state
            .nodes
            .iter()
            .find(|a| self.key.verify(&volume, &a.node_id, a.attached_at, &tag))
            .ok_or(Refusal::Denied)?;
        let path = match self
            .backend
            .export(&record, &holder.node_id)
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?
        {
            ExportInfo::LocalFile { path } => path,
            ExportInfo::Nbd { .. } | ExportInfo::NvmeTcp { .. } => {
                return Err(Refusal::Unavailable(
                    "the backend does not keep this volume as a local image".into(),
                ))
            }
        };
        Ok(Grant {
            volume,
            node: holder.node_id.clone(),
            attached_at: holder.attached_at,
            path,
            readonly: holder.readonly,
        })
    }

    async fn still_valid(&self, grant: &Grant) -> bool {
        match self.attachments.load(&grant.volume).await {
            Ok(Some(state)) => state
                .nodes
                .iter()
                .any(|a| a.node_id == grant.node && a.attached_at == grant.attached_at),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_bind_volume_node_and_attachment() {
        let key = ExportKey::generate();
        let (v, a, b) = (
            VolumeId::generate(),
            NodeId::parse("node-a").unwrap(),
            NodeId::parse("node-b").unwrap(),
        );
        let at = Utc::now();
        let name = key.export_name(&v, &a, at);
        let (volume, tag) = parse_export_name(&name).unwrap();
        assert_eq!(volume, v);
        assert!(key.verify(&v, &a, at, &tag));
        assert!(!key.verify(&v, &b, at, &tag), "another node");
        assert!(
            !key.verify(&v, &a, at + chrono::Duration::nanoseconds(1), &tag),
            "a later attachment"
        );
        assert!(
            !ExportKey::generate().verify(&v, &a, at, &tag),
            "another controller key"
        );
        for bad in [
            "",
            "vol-x",
            &format!("{v}."),
            &format!("{v}.{}", "z".repeat(64)),
            &format!("../etc.{}", "0".repeat(64)),
            &format!("{v}.{}0", "0".repeat(64)),
        ] {
            assert!(parse_export_name(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn fence_tokens_bind_volume_and_node() {
        let key = ExportKey::generate();
        let (v, a, b) = (
            VolumeId::generate(),
            NodeId::parse("node-a").unwrap(),
            NodeId::parse("node-b").unwrap(),
        );
        let t = key.fence_token(&v, &a);
        assert!(key.verify_fence(&v, &a, &t));
        assert!(!key.verify_fence(&v, &b, &t));
        assert!(!key.verify_fence(&VolumeId::generate(), &a, &t));
        assert!(!ExportKey::generate().verify_fence(&v, &a, &t));
        assert!(!key.verify_fence(&v, &a, "zz"));
    }

    #[test]
    fn the_key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd-export.key");
        let k1 = ExportKey::load_or_create(&path).unwrap();
        let k2 = ExportKey::load_or_create(&path).unwrap();
        assert_eq!(k1.0, k2.0);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"short").unwrap();
        assert!(ExportKey::load_or_create(&path).is_err());
    }
}
