//! Who may connect to which export: a node holding a current attachment, proven by a
//! per-attachment secret in the export name. The secret is an HMAC of the attachment
//! (volume, node, attach time) under the controller's key, so nothing secret is stored
//! in the attachment state, a re-publish returns the same publish_context, and a new
//! attachment gets a new secret.

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

/// The controller's export-signing keys (32 random bytes each, file mode 0600). Replicas
/// and targets that serve the same exports share the file (a mounted Secret). The first
/// key signs; every key verifies, so a key can be rotated without breaking live
/// attachments: put the new key first, and drop the old one once the attachments made
/// under it have ended.
pub struct ExportKey(Vec<[u8; KEY_LEN]>);

impl std::fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExportKey({} key(s))", self.0.len())
    }
}

fn parse_keys(path: &Path, b: &[u8]) -> std::io::Result<ExportKey> {
    if b.is_empty() || b.len() % KEY_LEN != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} must hold one or more {KEY_LEN}-byte keys (it has {} bytes)",
                path.display(),
                b.len()
            ),
        ));
    }
    Ok(ExportKey(
        b.chunks_exact(KEY_LEN)
            .map(|c| c.try_into().expect("exact chunks"))
            .collect(),
    ))
}

impl ExportKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        ExportKey(vec![bytes])
    }

    pub fn generate() -> Self {
        let mut b = [0u8; KEY_LEN];
        b[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        b[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        ExportKey(vec![b])
    }

    /// Reads the keys, creating one (0600, written to a temporary file, synced, then
    /// linked into place) when the file does not exist: a crash or a full disk never
    /// leaves a short key behind.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(b) => parse_keys(path, &b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                if crate::durable::create_exclusive(path, &key.0[0])? {
                    Ok(key)
                } else {
                    // Another process created it first: use theirs.
                    Self::load(path)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Reads existing keys (a target on another host must use the controller's).
    pub fn load(path: &Path) -> std::io::Result<Self> {
        parse_keys(path, &std::fs::read(path)?)
    }

    fn hmac(key: &[u8; KEY_LEN], parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                mac.update(b"\0");
            }
            mac.update(p);
        }
        mac
    }

    fn sign(&self, parts: &[&[u8]]) -> String {
        hex(&Self::hmac(&self.0[0], parts).finalize().into_bytes())
    }

    /// Constant-time comparison against every key.
    fn verify_parts(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.0
            .iter()
            .any(|k| Self::hmac(k, parts).verify_slice(tag).is_ok())
    }

    fn attachment_parts<'a>(
        volume: &'a VolumeId,
        node: &'a NodeId,
        at: &'a [u8; 8],
    ) -> [&'a [u8]; 3] {
        [volume.as_str().as_bytes(), node.as_str().as_bytes(), at]
    }

    fn nanos(at: DateTime<Utc>) -> [u8; 8] {
        at.timestamp_nanos_opt().unwrap_or_default().to_be_bytes()
    }

    /// Proves a fence request comes from a holder of the key (the controller), for this
    /// volume, node, time and nonce: a recorded request cannot be replayed elsewhere or
    /// later.
    pub fn fence_token(
        &self,
        volume: &VolumeId,
        node: &NodeId,
        at: DateTime<Utc>,
        nonce: &str,
    ) -> String {
        let at = Self::nanos(at);
        self.sign(&[
            b"fence",
            volume.as_str().as_bytes(),
            node.as_str().as_bytes(),
            &at,
            nonce.as_bytes(),
        ])
    }

    pub fn verify_fence(
        &self,
        volume: &VolumeId,
        node: &NodeId,
        at: DateTime<Utc>,
        nonce: &str,
        token: &str,
    ) -> bool {
        let at = Self::nanos(at);
        unhex(token).is_some_and(|tag| {
            self.verify_parts(
                &[
                    b"fence",
                    volume.as_str().as_bytes(),
                    node.as_str().as_bytes(),
                    &at,
                    nonce.as_bytes(),
                ],
                &tag,
            )
        })
    }

    /// Authenticates a fence reply: a forged "done" would free a slot while the node
    /// can still write.
    pub fn fence_reply_mac(&self, nonce: &str, connections: usize) -> String {
        self.sign(&[
            b"fence-reply",
            nonce.as_bytes(),
            &(connections as u64).to_be_bytes(),
        ])
    }

    pub fn verify_fence_reply(&self, nonce: &str, connections: usize, mac: &str) -> bool {
        unhex(mac).is_some_and(|tag| {
            self.verify_parts(
                &[
                    b"fence-reply",
                    nonce.as_bytes(),
                    &(connections as u64).to_be_bytes(),
                ],
                &tag,
            )
        })
    }

    /// The export name a node uses for this attachment: `<volume id>.<64 hex>`.
    pub fn export_name(&self, volume: &VolumeId, node: &NodeId, at: DateTime<Utc>) -> String {
        let at = Self::nanos(at);
        format!(
            "{volume}.{}",
            self.sign(&Self::attachment_parts(volume, node, &at))
        )
    }

    fn verify(&self, volume: &VolumeId, node: &NodeId, at: DateTime<Utc>, tag: &[u8]) -> bool {
        let at = Self::nanos(at);
        self.verify_parts(&Self::attachment_parts(volume, node, &at), tag)
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
            // An unpublished node awaiting its fence holds its slot, not its access.
            .find(|a| !a.fencing && self.key.verify(&volume, &a.node_id, a.attached_at, &tag))
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
            Ok(Some(state)) => state.nodes.iter().any(|a| {
                !a.fencing && a.node_id == grant.node && a.attached_at == grant.attached_at
            }),
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
        let (at, nonce) = (Utc::now(), "n-1");
        let t = key.fence_token(&v, &a, at, nonce);
        assert!(key.verify_fence(&v, &a, at, nonce, &t));
        assert!(!key.verify_fence(&v, &b, at, nonce, &t));
        assert!(!key.verify_fence(&VolumeId::generate(), &a, at, nonce, &t));
        assert!(!key.verify_fence(&v, &a, at, "n-2", &t), "another nonce");
        let later = at + chrono::Duration::seconds(1);
        assert!(!key.verify_fence(&v, &a, later, nonce, &t), "another time");
        assert!(!ExportKey::generate().verify_fence(&v, &a, at, nonce, &t));
        assert!(!key.verify_fence(&v, &a, at, nonce, "zz"));
        let mac = key.fence_reply_mac(nonce, 2);
        assert!(key.verify_fence_reply(nonce, 2, &mac));
        assert!(!key.verify_fence_reply(nonce, 0, &mac), "a forged count");
        assert!(
            !key.verify_fence_reply("n-2", 2, &mac),
            "another request's reply"
        );
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
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, b"short").unwrap();
        assert!(ExportKey::load_or_create(&path).is_err());
        std::fs::write(&path, b"").unwrap();
        assert!(
            ExportKey::load_or_create(&path).is_err(),
            "an empty key file is refused"
        );
    }

    /// Issue 15 case 16: rotation keeps live attachments working.
    #[test]
    fn a_rotated_key_still_verifies_names_made_under_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd-export.key");
        let old = ExportKey::load_or_create(&path).unwrap();
        let (v, a, at) = (
            VolumeId::generate(),
            NodeId::parse("node-a").unwrap(),
            Utc::now(),
        );
        let name = old.export_name(&v, &a, at);
        let new = ExportKey::generate();
        let mut rotated = new.0[0].to_vec();
        rotated.extend_from_slice(&old.0[0]);
        std::fs::write(&path, rotated).unwrap();
        let both = ExportKey::load(&path).unwrap();
        let (_, tag) = parse_export_name(&name).unwrap();
        assert!(
            both.verify(&v, &a, at, &tag),
            "the live attachment's name still works"
        );
        assert_eq!(
            both.export_name(&v, &a, at),
            new.export_name(&v, &a, at),
            "the new key signs"
        );
        assert!(!new.verify(&v, &a, at, &tag));
    }
}
