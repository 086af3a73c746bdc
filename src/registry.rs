//! Without Kubernetes, which nodes exist: each node plugin writes a record into a
//! directory shared with the controller (at start-up and at NodeGetInfo), and the
//! controller answers NotFound for a ControllerPublish naming a node that never did.
//! Only the node asked for is looked up: a holder missing from the registry is never
//! treated as gone (that would free a slot on hearsay).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    node_id: String,
    registered_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone)]
pub struct NodeRegistry {
    dir: PathBuf,
}

impl NodeRegistry {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NodeRegistry { dir: dir.into() }
    }

    /// The default place: beside the images, which nodes share when they share storage.
    pub fn default_dir(data_dir: &Path) -> PathBuf {
        data_dir.join(".nodes")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node ids are opaque and up to 128 bytes: the file is named by the id's SHA-256,
    /// so no id reaches a path as is; the record inside names the id.
    fn path(&self, node: &NodeId) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(node.as_str().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.node"))
    }

    /// Records the node (atomically; again is harmless).
    pub fn register(&self, node: &NodeId) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let record = Record {
            node_id: node.to_string(),
            registered_at: chrono::Utc::now(),
        };
        let body = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        crate::durable::write_atomic(&self.path(node), &body)
    }

    /// Whether the node registered. An unreadable directory is an error, not a "no".
    pub fn knows(&self, node: &NodeId) -> std::io::Result<bool> {
        match std::fs::read(self.path(node)) {
            Ok(bytes) => {
                let record: Record = serde_json::from_slice(&bytes)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                Ok(record.node_id == node.as_str())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_nodes_are_known_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let reg = NodeRegistry::new(dir.path().join("nodes"));
        let a = NodeId::parse("node-a").unwrap();
        let odd = NodeId::parse(&"n".repeat(128)).unwrap();
        assert!(!reg.knows(&a).unwrap(), "nothing registered yet");
        reg.register(&a).unwrap();
        reg.register(&a).unwrap();
        assert!(reg.knows(&a).unwrap());
        assert!(!reg.knows(&NodeId::parse("node-b").unwrap()).unwrap());
        reg.register(&odd).unwrap();
        assert!(reg.knows(&odd).unwrap(), "a 128-byte id fits a file name");
        for entry in std::fs::read_dir(reg.dir()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".node").expect("a .node file");
            assert!(
                stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}"
            );
        }
    }
}
