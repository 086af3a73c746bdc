//! The NBD target: serves published volumes' images over TCP to the nodes they are
//! published to, and fences a node (drops its connections, refuses it again) when it
//! loses its attachment.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::ids::{NodeId, VolumeId};
use crate::nbd::proto::*;

/// What a valid export name grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub volume: VolumeId,
    pub node: NodeId,
    /// Which attachment of that node: a later one is a different grant.
    pub attached_at: chrono::DateTime<chrono::Utc>,
    pub path: PathBuf,
    pub readonly: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Malformed, or no such volume: NBD_REP_ERR_UNKNOWN.
    #[error("no such export")]
    Unknown,
    /// The volume exists but the name does not carry a current attachment's secret.
    #[error("export not published to this client")]
    Denied,
    #[error("cannot check the export now: {0}")]
    Unavailable(String),
}

/// Decides which export names are valid right now, and for which node.
#[async_trait]
pub trait ExportAuthority: Send + Sync + 'static {
    async fn authorize(&self, export_name: &str) -> Result<Grant, Refusal>;
    /// Whether a grant handed out earlier still stands (its attachment still exists).
    async fn still_valid(&self, grant: &Grant) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error(
        "connection of node {node} to volume {volume} did not stop within {0:?}",
        FENCE_TIMEOUT
    )]
    Timeout { volume: VolumeId, node: NodeId },
    #[error("fencing node {node} off volume {volume} at the remote target failed: {reason}")]
    Remote {
        volume: VolumeId,
        node: NodeId,
        reason: String,
    },
}

/// How long a fence waits for a connection's in-flight request to finish.
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on options per handshake.
const MAX_OPTIONS: usize = 32;
/// Connections served at once; more are closed at accept (unauthenticated peers must
/// not be able to grow the target without bound).
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a WRITE's payload may take to arrive once its header did.
const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Fenced attachments remembered (newest kept): enough for every detach between a
/// fence and the moment the target's view of the attachment state catches up.
const FENCED_REMEMBERED: usize = 4096;

struct Connection {
    id: u64,
    grant: Grant,
    fenced: AtomicBool,
    stop: Notify,
    done: watch::Receiver<bool>,
}

type Key = (VolumeId, NodeId);

pub struct NbdTarget {
    authority: Arc<dyn ExportAuthority>,
    live: Mutex<HashMap<Key, Vec<Arc<Connection>>>>,
    next_id: AtomicU64,
    /// (volume, node) fenced as of a time: a grant for an attachment made then or
    /// before is refused, whatever the authority's (possibly lagging) view says.
    fenced: Mutex<std::collections::VecDeque<(Key, chrono::DateTime<chrono::Utc>)>>,
    slots: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("handshake timed out")]
    HandshakeTimeout,
}

/// Outcome of the option haggling.
enum Haggled {
    Transmit(Grant),
    Closed,
}

impl NbdTarget {
    pub fn new(authority: Arc<dyn ExportAuthority>) -> Arc<Self> {
        Self::with_connection_limit(authority, MAX_CONNECTIONS)
    }

    /// A target serving at most `limit` connections at once.
    pub fn with_connection_limit(authority: Arc<dyn ExportAuthority>, limit: usize) -> Arc<Self> {
        Arc::new(NbdTarget {
            authority,
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            fenced: Mutex::new(std::collections::VecDeque::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
        })
    }

    /// Whether `grant`'s attachment was fenced here.
    fn is_fenced(&self, grant: &Grant) -> bool {
        self.fenced
            .lock()
            .iter()
            .any(|((v, n), at)| v == &grant.volume && n == &grant.node && grant.attached_at <= *at)
    }

    fn remember_fence(
        &self,
        volume: &VolumeId,
        node: &NodeId,
        as_of: chrono::DateTime<chrono::Utc>,
    ) {
        let mut fenced = self.fenced.lock();
        fenced.retain(|((v, n), _)| !(v == volume && n == node));
        fenced.push_back(((volume.clone(), node.clone()), as_of));
        while fenced.len() > FENCED_REMEMBERED {
            fenced.pop_front();
        }
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "NBD connection limit reached; closing the new one");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let target = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = target.connection(stream).await {
                    tracing::debug!(%peer, error = %e, "NBD connection ended");
                }
            });
        }
    }

    /// Drops every connection of `node` to `volume` and returns once none can write any
    /// more (in-flight requests finish first). The attachment is remembered as fenced
    /// first, so a reconnect is refused here even while the attachment state still
    /// lists the node (fence before free) or the target's view of it lags.
    pub async fn fence(&self, volume: &VolumeId, node: &NodeId) -> Result<usize, FenceError> {
        self.fence_as_of(volume, node, chrono::Utc::now()).await
    }

    /// `fence`, for attachments made at or before `as_of` (the controller's clock, for a
    /// target on another host).
    pub async fn fence_as_of(
        &self,
        volume: &VolumeId,
        node: &NodeId,
        as_of: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, FenceError> {
        self.remember_fence(volume, node, as_of);
        let conns = self
            .live
            .lock()
            .get(&(volume.clone(), node.clone()))
            .cloned()
            .unwrap_or_default();
        for c in &conns {
            c.fenced.store(true, Ordering::SeqCst);
            c.stop.notify_one();
        }
        for c in &conns {
            let mut done = c.done.clone();
            if tokio::time::timeout(FENCE_TIMEOUT, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                return Err(FenceError::Timeout {
                    volume: volume.clone(),
                    node: node.clone(),
                });
            }
        }
        Ok(conns.len())
    }

    /// Re-checks every live connection's grant every `every` and drops those whose
    /// attachment is gone: the backstop for a detach this target did not fence itself
    /// (another controller replica served the ControllerUnpublish).
    pub fn spawn_revalidation(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let target = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let live: Vec<Arc<Connection>> =
                    target.live.lock().values().flatten().cloned().collect();
                for c in live {
                    if !target.authority.still_valid(&c.grant).await {
                        tracing::warn!(volume_id = %c.grant.volume, node_id = %c.grant.node, "NBD client no longer attached; dropping it");
                        c.fenced.store(true, Ordering::SeqCst);
                        c.stop.notify_one();
                    }
                }
            }
        })
    }

    /// Live connections of `node` to `volume`.
    pub fn connections(&self, volume: &VolumeId, node: &NodeId) -> usize {
        self.live
            .lock()
            .get(&(volume.clone(), node.clone()))
            .map_or(0, Vec::len)
    }

    async fn connection(self: Arc<Self>, stream: TcpStream) -> Result<(), ConnError> {
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut wr = BufWriter::new(wr);
        let grant =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut rd, &mut wr)).await {
                Err(_) => return Err(ConnError::HandshakeTimeout),
                Ok(r) => match r? {
                    Haggled::Transmit(g) => g,
                    Haggled::Closed => return Ok(()),
                },
            };
        let (done_tx, done_rx) = watch::channel(false);
        let conn = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            grant: grant.clone(),
            fenced: AtomicBool::new(false),
            stop: Notify::new(),
            done: done_rx,
        });
        let key = (grant.volume.clone(), grant.node.clone());
        self.live
            .lock()
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        // Registered first, then checked again: a fence that scanned before we
        // registered remembered the attachment first, so this check refuses.
        let still = !self.is_fenced(&grant) && self.authority.still_valid(&grant).await;
        let result = if still {
            tracing::info!(volume_id = %grant.volume, node_id = %grant.node, "NBD client connected");
            transmit(&grant, &conn, &mut rd, &mut wr).await
        } else {
            Ok(())
        };
        if let Some(v) = self.live.lock().get_mut(&key) {
            v.retain(|c| c.id != conn.id);
        }
        self.live.lock().retain(|_, v| !v.is_empty());
        let _ = done_tx.send(true);
        if conn.fenced.load(Ordering::SeqCst) {
            tracing::warn!(volume_id = %grant.volume, node_id = %grant.node, "NBD client fenced");
        }
        result
    }

    async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Haggled, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&NBDMAGIC.to_be_bytes()).await?;
        wr.write_all(&IHAVEOPT.to_be_bytes()).await?;
        wr.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .await?;
        wr.flush().await?;
        let client_flags = rd.read_u32().await?;
        if client_flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0
            || client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0
        {
            return Err(ConnError::Protocol("client flags"));
        }
        let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
        for _ in 0..MAX_OPTIONS {
            if rd.read_u64().await? != IHAVEOPT {
                return Err(ConnError::Protocol("option magic"));
            }
            let option = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > MAX_OPTION_LEN {
                return Err(ConnError::Protocol("option too long"));
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            match option {
                OPT_EXPORT_NAME => {
                    // No error reply exists for this option: a refusal closes.
                    let Ok(grant) = self.authorize(&data).await else {
                        return Ok(Haggled::Closed);
                    };
                    let size = image_size(&grant).await?;
                    wr.write_all(&size.to_be_bytes()).await?;
                    wr.write_all(&transmission_flags(&grant).to_be_bytes())
                        .await?;
                    if !no_zeroes {
                        wr.write_all(&[0u8; 124]).await?;
                    }
                    wr.flush().await?;
                    return Ok(Haggled::Transmit(grant));
                }
                OPT_ABORT => {
                    write_option_reply(wr, option, REP_ACK, &[]).await?;
                    wr.flush().await?;
                    return Ok(Haggled::Closed);
                }
                OPT_INFO | OPT_GO => {
                    let Some(name) = parse_info_request(&data) else {
                        write_option_reply(wr, option, REP_ERR_INVALID, b"malformed request")
                            .await?;
                        wr.flush().await?;
                        continue;
                    };
                    match self.authorize(name).await {
                        Ok(grant) => {
                            let size = image_size(&grant).await?;
                            let info = info_export(size, transmission_flags(&grant));
                            write_option_reply(wr, option, REP_INFO, &info).await?;
                            let bs = info_block_size(1, 4096, MAX_REQUEST_LEN);
                            write_option_reply(wr, option, REP_INFO, &bs).await?;
                            write_option_reply(wr, option, REP_ACK, &[]).await?;
                            wr.flush().await?;
                            if option == OPT_GO {
                                return Ok(Haggled::Transmit(grant));
                            }
                        }
                        Err(refusal) => {
                            let (code, msg): (u32, &[u8]) = match refusal {
                                Refusal::Unknown => (REP_ERR_UNKNOWN, b"no such export"),
                                Refusal::Denied => {
                                    (REP_ERR_POLICY, b"export not published to this client")
                                }
                                // Not final: the client retries.
                                Refusal::Unavailable(_) => {
                                    (REP_ERR_SHUTDOWN, b"authorisation unavailable; retry")
                                }
                            };
                            write_option_reply(wr, option, code, msg).await?;
                            wr.flush().await?;
                        }
                    }
                }
                // Export names carry secrets: they are never listed.
                OPT_LIST => {
                    write_option_reply(wr, option, REP_ERR_POLICY, b"listing is disabled").await?;
                    wr.flush().await?;
                }
                _ => {
                    write_option_reply(wr, option, REP_ERR_UNSUP, &[]).await?;
                    wr.flush().await?;
                }
            }
        }
        Err(ConnError::Protocol("too many options"))
    }

    async fn authorize(&self, name: &[u8]) -> Result<Grant, Refusal> {
        let name = std::str::from_utf8(name).map_err(|_| Refusal::Unknown)?;
        let grant = self.authority.authorize(name).await?;
        if self.is_fenced(&grant) {
            return Err(Refusal::Denied);
        }
        Ok(grant)
    }
}

fn transmission_flags(grant: &Grant) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if grant.readonly {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

async fn image_size(grant: &Grant) -> std::io::Result<u64> {
    Ok(tokio::fs::metadata(&grant.path).await?.len())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

fn errno(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => ENOSPC,
        Some(libc::EPERM) | Some(libc::EACCES) => EPERM,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        _ => EIO,
    }
}

/// The transmission phase: one request at a time, each finished (written to the image)
/// before the next is read or a fence is honoured.
async fn transmit<R, W>(
    grant: &Grant,
    conn: &Connection,
    rd: &mut R,
    wr: &mut W,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(!grant.readonly)
            .open(&grant.path)?,
    );
    loop {
        let req = tokio::select! {
            biased;
            _ = conn.stop.notified() => return Ok(()),
            r = read_request(rd) => r?,
        };
        if conn.fenced.load(Ordering::SeqCst) {
            return Ok(());
        }
        let size = file.metadata()?.len();
        let in_range = req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|end| end <= size);
        match req.kind {
            CMD_READ => {
                if !in_range || req.length > MAX_REQUEST_LEN {
                    wr.write_all(&simple_reply(EINVAL, req.cookie)).await?;
                } else {
                    let f = file.clone();
                    let (off, len) = (req.offset, req.length as usize);
                    let data = blocking(move || {
                        let mut buf = vec![0u8; len];
                        f.read_exact_at(&mut buf, off)?;
                        Ok(buf)
                    })
                    .await;
                    match data {
                        Ok(buf) => {
                            wr.write_all(&simple_reply(0, req.cookie)).await?;
                            wr.write_all(&buf).await?;
                        }
                        Err(e) => wr.write_all(&simple_reply(errno(&e), req.cookie)).await?,
                    }
                }
            }
            CMD_WRITE => {
                if req.length > MAX_REQUEST_LEN {
                    return Err(ConnError::Protocol("write larger than the maximum"));
                }
                let mut buf = vec![0u8; req.length as usize];
                // A fence does not wait for a payload that trickles: it ends the
                // connection, and a payload that takes too long ends it too.
                tokio::select! {
                    biased;
                    _ = conn.stop.notified() => return Ok(()),
                    r = tokio::time::timeout(PAYLOAD_TIMEOUT, rd.read_exact(&mut buf)) => {
                        r.map_err(|_| ConnError::Protocol("write payload too slow"))??;
                    }
                }
                // Fenced while the payload arrived: it is not applied.
                if conn.fenced.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let error = if grant.readonly {
                    EPERM
                } else if !in_range {
                    ENOSPC
                } else {
                    let f = file.clone();
                    let (off, fua) = (req.offset, req.flags & CMD_FLAG_FUA != 0);
                    match blocking(move || {
                        f.write_all_at(&buf, off)?;
                        if fua {
                            f.sync_data()?;
                        }
                        Ok(())
                    })
                    .await
                    {
                        Ok(()) => 0,
                        Err(e) => errno(&e),
                    }
                };
                wr.write_all(&simple_reply(error, req.cookie)).await?;
            }
            CMD_FLUSH => {
                let f = file.clone();
                let error = match blocking(move || f.sync_data()).await {
                    Ok(()) => 0,
                    Err(e) => errno(&e),
                };
                wr.write_all(&simple_reply(error, req.cookie)).await?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let error = if grant.readonly {
                    EPERM
                } else if !in_range {
                    ENOSPC
                } else {
                    let f = file.clone();
                    let (off, len) = (req.offset, req.length);
                    // Punching a hole both discards and reads back as zeroes.
                    match blocking(move || punch_hole(&f, off, u64::from(len))).await {
                        Ok(()) => 0,
                        Err(e) => errno(&e),
                    }
                };
                wr.write_all(&simple_reply(error, req.cookie)).await?;
            }
            CMD_DISC => {
                wr.flush().await?;
                return Ok(());
            }
            _ => wr.write_all(&simple_reply(EINVAL, req.cookie)).await?,
        }
        wr.flush().await?;
    }
}

fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on an fd we own, with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
