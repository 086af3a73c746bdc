//! A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies, one request in
//! flight): what a node uses to reach an export, and what tests use to prove access
//! control and fencing.

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::nbd::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD server refused the export (reply {code:#x}): {message}")]
    Refused { code: u32, message: String },
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    #[error("NBD request failed with errno {0}")]
    Errno(u32),
}

impl ClientError {
    /// The target asked to try again (it could not check this node's authorisation
    /// now): not a refusal, retried within the I/O deadline.
    pub fn retry_later(&self) -> bool {
        matches!(self, ClientError::Refused { code, .. } if *code == REP_ERR_SHUTDOWN)
    }
}

pub struct NbdClient {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `addr` and opens `export` with NBD_OPT_GO.
    pub async fn connect(addr: &str, export: &str) -> Result<Self, ClientError> {
        let (mut rd, mut wr) = Self::greet(addr).await?;
        let (size, flags) = Self::haggle(&mut rd, &mut wr, OPT_GO, export).await?;
        Ok(NbdClient {
            rd,
            wr,
            size,
            flags,
            cookie: 0,
        })
    }

    /// The export's current size (NBD_OPT_INFO on a short connection of its own).
    pub async fn export_size(addr: &str, export: &str) -> Result<u64, ClientError> {
        let (mut rd, mut wr) = Self::greet(addr).await?;
        let (size, _) = Self::haggle(&mut rd, &mut wr, OPT_INFO, export).await?;
        wr.write_u64(IHAVEOPT).await?;
        wr.write_u32(OPT_ABORT).await?;
        wr.write_u32(0).await?;
        wr.flush().await?;
        Ok(size)
    }

    async fn greet(
        addr: &str,
    ) -> Result<(BufReader<OwnedReadHalf>, BufWriter<OwnedWriteHalf>), ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let (mut rd, mut wr) = (BufReader::new(rd), BufWriter::new(wr));
        if rd.read_u64().await? != NBDMAGIC || rd.read_u64().await? != IHAVEOPT {
            return Err(ClientError::Protocol("not a newstyle NBD server".into()));
        }
        let server_flags = rd.read_u16().await?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "server does not speak fixed newstyle".into(),
            ));
        }
        let mut client_flags = CLIENT_FLAG_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= CLIENT_FLAG_NO_ZEROES;
        }
        wr.write_u32(client_flags).await?;
        Ok((rd, wr))
    }

    /// Sends NBD_OPT_GO or NBD_OPT_INFO for `export`; returns its size and flags.
    async fn haggle(
        rd: &mut BufReader<OwnedReadHalf>,
        wr: &mut BufWriter<OwnedWriteHalf>,
        option: u32,
        export: &str,
    ) -> Result<(u64, u16), ClientError> {
        let data = info_request(export);
        wr.write_u64(IHAVEOPT).await?;
        wr.write_u32(option).await?;
        wr.write_u32(data.len() as u32).await?;
        wr.write_all(&data).await?;
        wr.flush().await?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            if rd.read_u64().await? != REPLY_MAGIC_OPT {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            let _option = rd.read_u32().await?;
            let reply = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > MAX_OPTION_LEN {
                return Err(ClientError::Protocol("option reply too long".into()));
            }
            let mut payload = vec![0u8; len as usize];
            rd.read_exact(&mut payload).await?;
            match reply {
                REP_ACK => break,
                REP_INFO => {
                    if payload.len() == 12 && payload[0..2] == INFO_EXPORT.to_be_bytes() {
                        size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                        flags = u16::from_be_bytes([payload[10], payload[11]]);
                    }
                }
                code if code & (1 << 31) != 0 => {
                    return Err(ClientError::Refused {
                        code,
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    })
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected option reply {other}"
                    )))
                }
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no export size".into()))?;
        Ok((size, flags))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The negotiated connection as a blocking socket, for the kernel's nbd driver to
    /// carry the transmission phase. Call inside the runtime that made it.
    pub fn into_std(self) -> Result<std::net::TcpStream, ClientError> {
        if !self.rd.buffer().is_empty() || !self.wr.buffer().is_empty() {
            return Err(ClientError::Protocol(
                "bytes left over from the handshake".into(),
            ));
        }
        let stream = self
            .rd
            .into_inner()
            .reunite(self.wr.into_inner())
            .map_err(|_| ClientError::Protocol("socket halves do not match".into()))?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    }

    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.cookie += 1;
        let req = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            length,
        };
        self.wr.write_all(&encode_request(&req)).await?;
        self.wr.write_all(payload).await?;
        self.wr.flush().await?;
        let magic = self.rd.read_u32().await?;
        let error = self.rd.read_u32().await?;
        let cookie = self.rd.read_u64().await?;
        if magic != SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(ClientError::Protocol("reply does not match request".into()));
        }
        if error != 0 {
            return Err(ClientError::Errno(error));
        }
        Ok(())
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.request(CMD_READ, 0, offset, len, &[]).await?;
        let mut buf = vec![0u8; len as usize];
        self.rd.read_exact(&mut buf).await?;
        Ok(buf)
    }

    /// Writes `data` at `offset`; `fua` makes it durable before the reply.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)
            .await
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).await
    }

    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_TRIM, 0, offset, len, &[]).await
    }

    /// NBD_CMD_DISC: the server closes after it (no reply).
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.cookie += 1;
        let req = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: self.cookie,
            offset: 0,
            length: 0,
        };
        self.wr.write_all(&encode_request(&req)).await?;
        self.wr.flush().await?;
        Ok(())
    }
}
