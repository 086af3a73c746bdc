//! The runtime image, really built and run: deploy/image/build.sh makes the bookworm root
//! filesystem from Debian's packages (mmdebstrap) and the OCI archive (umoci); the driver
//! then runs chrooted inside it (`--mode all`, /dev, /proc and /sys bound in) and serves
//! a block, an ext4 and an xfs lifecycle over its socket. Every tool the node plugin can
//! exec resolves in the image, and the Dockerfile and the script install the same
//! packages. Needs root (mmdebstrap, chroot, loop devices, mounts).

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_csi::csi;
use support::lab_steps::{attach_to, detach_from};
use support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn words(list: &str) -> BTreeSet<String> {
    list.split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .map(String::from)
        .collect()
}

/// PACKAGES="…" in build.sh, and the runtime stage's `apt-get install` in the Dockerfile.
fn package_lists() -> (BTreeSet<String>, BTreeSet<String>) {
    let script = std::fs::read_to_string(repo("deploy/image/build.sh")).unwrap();
    let line = script
        .lines()
        .find_map(|l| l.strip_prefix("PACKAGES=\""))
        .expect("build.sh sets PACKAGES");
    let from_script = words(line.trim_end_matches('"'));
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let runtime = dockerfile.split("FROM ").last().expect("a runtime stage");
    let install = runtime
        .lines()
        .find_map(|l| l.split_once("apt-get install").map(|(_, rest)| rest))
        .expect("the runtime stage installs packages");
    (from_script, words(install))
}

#[test]
fn the_dockerfile_and_the_image_script_install_the_same_packages() {
    let (script, dockerfile) = package_lists();
    assert!(script.contains("xfsprogs"), "{script:?}");
    assert_eq!(
        script, dockerfile,
        "deploy/image/build.sh's PACKAGES and the Dockerfile's runtime packages drifted"
    );
}

/// Every program the node plugin runs (`runner.run("…"` and `Command::new("…")` in the
/// node's code), read from the source so that a new one cannot be forgotten here.
fn node_tools() -> BTreeSet<String> {
    let mut tools = BTreeSet::new();
    let mut stack = vec![repo("src/node"), repo("src/nbd/node")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap();
            // rustfmt may put the program's name on the next line.
            for marker in [".run(", "Command::new("] {
                for part in text.split(marker).skip(1) {
                    let Some(rest) = part.trim_start().strip_prefix('"') else {
                        continue;
                    };
                    let name: String = rest.chars().take_while(|c| *c != '"').collect();
                    if !name.is_empty() && !name.contains('/') {
                        tools.insert(name);
                    }
                }
            }
        }
    }
    tools
}

fn in_image(root: &Path, tool: &str) -> bool {
    ["usr/sbin", "sbin", "usr/bin", "bin"]
        .iter()
        .any(|d| std::fs::metadata(root.join(d).join(tool)).is_ok_and(|m| m.is_file()))
}

/// /dev, /proc and /sys of the host inside the image, for as long as it runs there.
struct Binds(Vec<PathBuf>);

impl Binds {
    fn new(root: &Path) -> Binds {
        let mut done = Vec::new();
        for d in ["dev", "proc", "sys"] {
            let target = root.join(d);
            std::fs::create_dir_all(&target).unwrap();
            nix::mount::mount(
                Some(Path::new("/").join(d).as_path()),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("bind /{d} into the image: {e}"));
            done.push(target);
        }
        Binds(done)
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        for t in self.0.iter().rev() {
            let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The OCI archive's image config (index → manifest → config).
fn image_config(archive: &Path, scratch: &Path) -> serde_json::Value {
    let dir = scratch.join("oci");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ok = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "the archive unpacks");
    let read = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    assert!(dir.join("oci-layout").exists(), "an OCI image layout");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    config
}

/// Create → ControllerPublish → NodeStage → NodePublish → data → and back, on `d`.
async fn lifecycle(d: &Driver, name: &str, bytes: i64, cap: csi::VolumeCapability) {
    let mut c = d.controller().await;
    let id = c
        .create_volume(create_request(name, bytes, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging, target) = attach_to(d, d, "node-a", &id, &cap, name).await;
    // The host sees the driver's mounts where the image keeps its dir.
    let seen = d
        .chrooted_dir()
        .unwrap()
        .join(target.strip_prefix(d.dir.path()).unwrap());
    if matches!(
        cap.access_type,
        Some(csi::volume_capability::AccessType::Block(_))
    ) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seen)
            .unwrap();
        f.write_all_at(b"written through the image", 4096).unwrap();
        let mut back = [0u8; 25];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(&back, b"written through the image");
    } else {
        std::fs::write(seen.join("hello"), name).unwrap();
        assert_eq!(std::fs::read_to_string(seen.join("hello")).unwrap(), name);
    }
    detach_from(d, d, "node-a", &id, (staging, target)).await;
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_image_is_built_offline_and_serves_lifecycles_from_inside() {
    if !require_root("the_image_is_built_offline_and_serves_lifecycles_from_inside") {
        return;
    }
    let out = repo("target/image-test");
    std::fs::create_dir_all(&out).unwrap();
    // A run that died with the image's binds in place left them: detach them first.
    for m in mounts_under(&out).iter().rev() {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    // The test build of the binary, without its debug info (a release build would add
    // minutes to CI; build.sh builds one when HANDOFF_BINARY is not set).
    let binary = out.join("handoff-csi");
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(env!("CARGO_BIN_EXE_handoff-csi"))
        .arg(&binary)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(env!("CARGO_BIN_EXE_handoff-csi"), &binary).unwrap();
    }
    let built = Command::new(repo("deploy/image/build.sh"))
        .arg(&out)
        .env("HANDOFF_BINARY", &binary)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "build.sh failed:\n{log}");
    let archive = out.join("handoff-csi.oci.tar");
    let size = std::fs::metadata(&archive).unwrap().len();
    eprintln!(
        "image: {} ({size} bytes, binary {} bytes)",
        archive.display(),
        std::fs::metadata(&binary).unwrap().len()
    );

    let config = image_config(&archive, &out);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/handoff-csi"])
    );
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "handoff-csi");
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");

    let root = out.join("rootfs");
    let tools = node_tools();
    for tool in ["blkid", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs"] {
        assert!(
            tools.contains(tool),
            "the source scan missed {tool}: {tools:?}"
        );
    }
    let missing: Vec<&String> = tools.iter().filter(|t| !in_image(&root, t)).collect();
    assert!(
        missing.is_empty(),
        "the node plugin runs {missing:?}, which the image does not have"
    );

    let binds = Binds::new(&root);
    let d = Driver::start_with(DriverOptions {
        chroot: Some(root.clone()),
        ..Default::default()
    })
    .await;
    lifecycle(&d, "image-block", 32 << 20, rwo_block()).await;
    lifecycle(&d, "image-ext4", 32 << 20, rwo_mount("ext4")).await;
    // Bookworm's mkfs.xfs makes nothing under 300 MB (sparse: costs no space).
    lifecycle(&d, "image-xfs", 320 << 20, rwo_mount("xfs")).await;
    drop(d);
    drop(binds);
    // Hundreds of MB (root filesystem, archive, binary): kept only when the test failed,
    // and never removed while anything is still mounted under it (/dev, /proc, /sys).
    let left = mounts_under(&out);
    assert!(left.is_empty(), "mounts left in the image: {left:?}");
    let _ = std::fs::remove_dir_all(&out);
}
