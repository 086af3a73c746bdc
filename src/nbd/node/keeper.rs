//! `handoff-csi nbd-keeper`: starts and owns the per-volume `nbd-client` processes on
//! behalf of the node plugin, from a pod of its own. The node plugin's container can then
//! be restarted or upgraded without ending any client: I/O on NBD volumes goes on.
//!
//! Protocol: one JSON `ClientLaunch` per connection on a 0600 Unix socket, answered by
//! `{"ok":true}` once the disk is mounted, or `{"error":"…"}`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::launch::{launch_client, ClientLaunch, Reply, MAX_REQUEST};
use crate::ids::VolumeId;

/// Only `<run dir>/<volume id>` may be mounted: the socket is root's, but a request is
/// still input.
fn check_mountpoint(run_dir: &Path, mountpoint: &Path) -> Result<(), String> {
    let name = mountpoint
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("mountpoint has no name")?;
    VolumeId::parse(name).map_err(|e| format!("mountpoint is not a volume's: {e}"))?;
    if mountpoint.parent() != Some(run_dir) {
        return Err(format!(
            "mountpoint {} is outside the keeper's run dir {}",
            mountpoint.display(),
            run_dir.display()
        ));
    }
    Ok(())
}

/// A launch names a volume's place in the run dir and, for the kernel's driver, a
/// backend identifier of that same volume.
fn check_launch(run_dir: &Path, launch: &ClientLaunch) -> Result<(), String> {
    check_mountpoint(run_dir, &launch.mountpoint)?;
    if let Some(k) = &launch.kernel {
        crate::nbd::node::kernel::check_backend(&k.backend)?;
        let volume = launch.mountpoint.file_name().and_then(|n| n.to_str());
        if volume.is_none_or(|v| !k.backend.ends_with(&format!("/{v}"))) {
            return Err(format!(
                "backend {:?} is not the volume of {}",
                k.backend,
                launch.mountpoint.display()
            ));
        }
    }
    Ok(())
}

async fn handle(stream: tokio::net::UnixStream, run_dir: &Path, binary: &Path) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let read = tokio::io::AsyncReadExt::take(rd, MAX_REQUEST);
    let result = match tokio::io::BufReader::new(read).read_line(&mut line).await {
        Err(e) => Err(format!("read request: {e}")),
        Ok(_) => match serde_json::from_str::<ClientLaunch>(&line) {
            Err(e) => Err(format!("malformed request: {e}")),
            Ok(launch) => match check_launch(run_dir, &launch) {
                Err(e) => Err(e),
                Ok(()) => {
                    let binary = binary.to_path_buf();
                    tokio::task::spawn_blocking(move || launch_client(&binary, &launch))
                        .await
                        .unwrap_or_else(|e| Err(format!("launch task failed: {e}")))
                }
            },
        },
    };
    let reply = match result {
        Ok(()) => Reply {
            ok: true,
            error: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "nbd-client not started");
            Reply {
                ok: false,
                error: Some(e),
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).expect("replies serialise");
    out.push(b'\n');
    let _ = wr.write_all(&out).await;
}

/// Serves launch requests on `socket` until the process ends.
pub async fn serve(socket: &Path, run_dir: &Path, binary: PathBuf) -> std::io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    let run_dir = std::fs::canonicalize(run_dir)?;
    // A socket left by a previous keeper would make bind fail.
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), run_dir = %run_dir.display(), "nbd-keeper ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let (run_dir, binary) = (run_dir.clone(), binary.clone());
        tokio::spawn(async move { handle(stream, &run_dir, &binary).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_volume_mountpoints_in_the_run_dir_are_accepted() {
        let run = Path::new("/run/handoff-csi/nbd");
        let v = VolumeId::generate();
        assert!(check_mountpoint(run, &run.join(v.as_str())).is_ok());
        for bad in [
            run.join("etc"),
            PathBuf::from(format!("/tmp/{v}")),
            run.join(format!("{v}/deeper")),
            PathBuf::from("/"),
        ] {
            assert!(check_mountpoint(run, &bad).is_err(), "{}", bad.display());
        }
    }
}
