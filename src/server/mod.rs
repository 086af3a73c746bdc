//! The gRPC listener: which services run in which mode, the Unix socket's life cycle
//! (stale socket replaced, private permissions, removed on exit) and graceful shutdown.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

mod authority;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::config::Endpoint;
use crate::controller::ControllerService;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::identity::IdentityService;
use crate::service::node::NodeService;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another process is already serving {0:?}; stop it or choose another --endpoint")]
    SocketInUse(PathBuf),
    #[error("{0:?} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub struct Services {
    pub identity: IdentityService,
    pub controller: Option<ControllerService>,
    pub node: Option<NodeService>,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes a socket left by a crashed instance; refuses if someone still answers on it.
fn clear_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("stat", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServerError::SocketInUse(path.to_path_buf()));
    }
    warn!(socket = %path.display(), "removing stale socket from a previous run");
    std::fs::remove_file(path).map_err(io("remove stale socket", path))
}

/// Binds with a restrictive umask so the socket is never reachable by others, not even
/// between bind and chmod.
fn bind_private(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create socket directory", dir))?;
    }
    clear_stale_socket(path)?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod socket", path))?;
    Ok(listener)
}

/// How long in-flight RPCs get after a shutdown signal before every connection is cut:
/// tonic's own drain waits for each connection to close, so one silent client could
/// hold the process forever.
pub const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `serving` (already told to stop by `shutdown`) and cuts it off `grace` after
/// the signal.
async fn bounded_drain<E>(
    serving: impl Future<Output = Result<(), E>>,
    fired: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) -> Result<(), E> {
    let cut = async move {
        let mut fired = fired;
        let _ = fired.wait_for(|f| *f).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = serving => result,
        () = cut => {
            warn!(grace = ?grace, "connections still open after the drain grace period; closing them");
            Ok(())
        }
    }
}

/// Serves until `shutdown` resolves, then lets in-flight RPCs finish for up to `grace`.
pub async fn serve(
    endpoint: &Endpoint,
    socket_mode: u32,
    services: Services,
    shutdown: impl Future<Output = ()> + Send,
    grace: std::time::Duration,
) -> Result<(), ServerError> {
    let (fire, fired) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = fire.send(true);
    };
    let router = Server::builder()
        .add_service(IdentityServer::new(services.identity))
        .add_optional_service(services.controller.map(ControllerServer::new))
        .add_optional_service(services.node.map(NodeServer::new));
    match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_private(path, socket_mode)?;
            info!(socket = %path.display(), "serving CSI");
            // Any client's `:authority` is accepted on the local socket (see authority.rs).
            let incoming = UnixListenerStream::new(listener)
                .map(|conn| conn.map(authority::NormalizeAuthority::new));
            let serving = router.serve_with_incoming_shutdown(incoming, shutdown);
            let result = bounded_drain(serving, fired, grace).await;
            let _ = std::fs::remove_file(path);
            info!("server stopped, socket removed");
            Ok(result?)
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| io("bind", Path::new(&addr.to_string()))(e))?;
            warn!(%addr, "serving CSI over TCP: for debugging only, there is no authentication");
            let serving =
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown);
            Ok(bounded_drain(serving, fired, grace).await?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_sockets_are_replaced_live_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let live = bind_private(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            clear_stale_socket(&path),
            Err(ServerError::SocketInUse(_))
        ));
        drop(live);
        // The file stays behind after the listener is gone, like after a crash.
        assert!(path.exists());
        let _again = bind_private(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }

    /// Issue 15 case 19: a client that opened HTTP/2 and went silent cannot hold shutdown.
    #[tokio::test]
    async fn a_silent_client_cannot_hold_shutdown() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let services = Services {
            identity: IdentityService::new(
                "test.csi".into(),
                false,
                Vec::new(),
                crate::metrics::Metrics::new(),
            ),
            controller: None,
            node: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let endpoint = Endpoint::Unix(path.clone());
        let server = tokio::spawn(async move {
            serve(
                &endpoint,
                0o600,
                services,
                async {
                    let _ = stopped.await;
                },
                std::time::Duration::from_millis(300),
            )
            .await
        });
        let mut silent = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        silent
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        stop.send(()).unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("shutdown is bounded even with a silent client connected");
        result.unwrap().unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        assert!(!path.exists(), "socket removed");
        drop(silent);
    }

    #[test]
    fn regular_files_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("important");
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(
            clear_stale_socket(&path),
            Err(ServerError::NotASocket(_))
        ));
        assert!(path.exists());
    }
}
