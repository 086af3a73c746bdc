//! The kernel NBD driver's generic-netlink interface (`nbd` family, Linux ≥ 4.12; the
//! backend identifier since 5.17): connect a device to sockets we negotiated, hand it a
//! new socket after a link died, disconnect it, and hear `LINK_DEAD`.
//!
//! Encoded by hand: four commands and a handful of attributes, against the uapi headers
//! (`linux/netlink.h`, `linux/genetlink.h`, `linux/nbd-netlink.h`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

pub const NBD_FAMILY: &str = "nbd";
const NBD_MCAST_GROUP: &str = "nbd_mc_group";
const NBD_GENL_VERSION: u8 = 1;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;

pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Received attributes of one level: (type without flags, payload).
pub type Attrs = Vec<(u16, Vec<u8>)>;

/// One netlink attribute to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    U32(u16, u32),
    U64(u16, u64),
    /// NUL-terminated on the wire.
    Str(u16, String),
    Nested(u16, Vec<Attr>),
}

impl Attr {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; NLA_HDRLEN]);
        let kind = match self {
            Attr::U32(k, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *k
            }
            Attr::U64(k, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *k
            }
            Attr::Str(k, s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
                *k
            }
            Attr::Nested(k, inner) => {
                for a in inner {
                    a.encode(out);
                }
                *k | NLA_F_NESTED
            }
        };
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
        out.resize(align4(out.len()), 0);
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A generic-netlink message: header fields and its encoded attributes.
pub fn encode_message(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDRLEN];
    out.extend_from_slice(&[cmd, version, 0, 0]);
    for a in attrs {
        a.encode(&mut out);
    }
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&family.to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}

/// A received message.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// NLMSG_ERROR: 0 is the ack, otherwise a negative errno.
    Ack {
        seq: u32,
        errno: i32,
    },
    Genl {
        family: u16,
        seq: u32,
        cmd: u8,
        attrs: Attrs,
    },
    Done,
}

/// Splits a datagram into messages; malformed lengths end the parse with an error.
pub fn parse_messages(buf: &[u8]) -> io::Result<Vec<Received>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(bad("message length out of range"));
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        let body = &rest[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_ERROR => {
                if body.len() < 4 {
                    return Err(bad("short error message"));
                }
                let errno = i32::from_ne_bytes(body[0..4].try_into().unwrap());
                out.push(Received::Ack { seq, errno });
            }
            NLMSG_DONE => out.push(Received::Done),
            family => {
                if body.len() < GENL_HDRLEN {
                    return Err(bad("short generic netlink header"));
                }
                out.push(Received::Genl {
                    family,
                    seq,
                    cmd: body[0],
                    attrs: parse_attrs(&body[GENL_HDRLEN..])?,
                });
            }
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// Attributes of one level.
pub fn parse_attrs(mut buf: &[u8]) -> io::Result<Attrs> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "netlink: attribute length out of range",
            ));
        }
        out.push((kind, buf[NLA_HDRLEN..len].to_vec()));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn attr_u32(attrs: &[(u16, Vec<u8>)], kind: u16) -> Option<u32> {
    attrs
        .iter()
        .find(|(k, v)| *k == kind && v.len() >= 4)
        .map(|(_, v)| u32::from_ne_bytes(v[0..4].try_into().unwrap()))
}

fn attr_u16(attrs: &[(u16, Vec<u8>)], kind: u16) -> Option<u16> {
    attrs
        .iter()
        .find(|(k, v)| *k == kind && v.len() >= 2)
        .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
}

/// What the kernel needs to drive a device on one negotiated connection.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub size: u64,
    pub block_size: u64,
    /// The export's transmission flags (plus READ_ONLY for a read-only attach).
    pub server_flags: u16,
    /// A request unanswered this long marks the connection dead.
    pub request_timeout: Duration,
    /// How long I/O waits for a new connection before failing.
    pub dead_conn_timeout: Duration,
    pub backend: String,
}

fn secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

fn sockets(fd: RawFd) -> Attr {
    Attr::Nested(
        NBD_ATTR_SOCKETS,
        vec![Attr::Nested(
            NBD_SOCK_ITEM,
            vec![Attr::U32(NBD_SOCK_FD, fd as u32)],
        )],
    )
}

/// The attributes of NBD_CMD_CONNECT for `config` over `fd`.
pub fn connect_attrs(config: &DeviceConfig, fd: RawFd) -> Vec<Attr> {
    vec![
        Attr::U64(NBD_ATTR_SIZE_BYTES, config.size),
        Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, config.block_size),
        Attr::U64(NBD_ATTR_SERVER_FLAGS, u64::from(config.server_flags)),
        Attr::U64(NBD_ATTR_TIMEOUT, secs(config.request_timeout)),
        Attr::U64(NBD_ATTR_DEAD_CONN_TIMEOUT, secs(config.dead_conn_timeout)),
        Attr::Str(NBD_ATTR_BACKEND_IDENTIFIER, config.backend.clone()),
        sockets(fd),
    ]
}

/// A generic-netlink socket bound to the `nbd` family.
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    group: Option<u32>,
    seq: u32,
}

impl NbdNetlink {
    /// Opens a socket and resolves the family; NotFound when the nbd driver is not loaded.
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let mut nl = NbdNetlink {
            fd,
            family: GENL_ID_CTRL,
            group: None,
            seq: 0,
        };
        let replies = nl.request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            1,
            &[Attr::Str(CTRL_ATTR_FAMILY_NAME, NBD_FAMILY.into())],
        );
        let replies = match replies {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the kernel has no nbd netlink family (nbd.ko not loaded)",
                ))
            }
            other => other?,
        };
        let attrs = replies
            .first()
            .ok_or_else(|| io::Error::other("nlctrl answered GETFAMILY with nothing"))?;
        nl.family = attr_u16(attrs, CTRL_ATTR_FAMILY_ID)
            .ok_or_else(|| io::Error::other("nlctrl did not name the nbd family id"))?;
        if let Some((_, groups)) = attrs.iter().find(|(k, _)| *k == CTRL_ATTR_MCAST_GROUPS) {
            for (_, group) in parse_attrs(groups)? {
                let group = parse_attrs(&group)?;
                let name = group
                    .iter()
                    .find(|(k, _)| *k == CTRL_ATTR_MCAST_GRP_NAME)
                    .map(|(_, v)| String::from_utf8_lossy(v).trim_end_matches('\0').to_owned());
                if name.as_deref() == Some(NBD_MCAST_GROUP) {
                    nl.group = attr_u32(&group, CTRL_ATTR_MCAST_GRP_ID);
                }
            }
        }
        Ok(nl)
    }

    /// Sends one command and collects the attributes of its replies until the ack.
    fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[Attr],
    ) -> io::Result<Vec<Attrs>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        send(
            self.fd.as_raw_fd(),
            &encode_message(family, cmd, version, seq, attrs),
            MsgFlags::empty(),
        )?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            for msg in parse_messages(&buf[..n])? {
                match msg {
                    Received::Ack { seq: s, errno } if s == seq => {
                        return if errno == 0 {
                            Ok(replies)
                        } else {
                            Err(io::Error::from_raw_os_error(-errno))
                        };
                    }
                    Received::Genl { seq: s, attrs, .. } if s == seq => replies.push(attrs),
                    // Events (LINK_DEAD) and stale answers are not this request's.
                    _ => {}
                }
            }
        }
    }

    /// Connects a free device to `fd`; returns its index.
    pub fn connect(&mut self, config: &DeviceConfig, fd: RawFd) -> io::Result<u32> {
        let replies = self.request(
            self.family,
            NBD_CMD_CONNECT,
            NBD_GENL_VERSION,
            &connect_attrs(config, fd),
        )?;
        replies
            .iter()
            .find_map(|a| attr_u32(a, NBD_ATTR_INDEX))
            .ok_or_else(|| io::Error::other("NBD_CMD_CONNECT answered without a device index"))
    }

    /// Gives device `index` a new connection in place of its dead one; `size` updates
    /// the device's size at the same time.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        fd: Option<RawFd>,
        size: Option<u64>,
    ) -> io::Result<()> {
        let mut attrs = vec![
            Attr::U32(NBD_ATTR_INDEX, index),
            Attr::Str(NBD_ATTR_BACKEND_IDENTIFIER, backend.to_owned()),
        ];
        if let Some(size) = size {
            attrs.push(Attr::U64(NBD_ATTR_SIZE_BYTES, size));
        }
        if let Some(fd) = fd {
            attrs.push(sockets(fd));
        }
        self.request(self.family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &attrs)
            .map(drop)
    }

    /// Disconnects device `index`: queued and later I/O fails at once.
    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        self.request(
            self.family,
            NBD_CMD_DISCONNECT,
            NBD_GENL_VERSION,
            &[Attr::U32(NBD_ATTR_INDEX, index)],
        )
        .map(drop)
    }

    /// Joins the family's multicast group, so that `next_link_dead` hears of dead links.
    pub fn subscribe(&mut self) -> io::Result<()> {
        let group = self
            .group
            .ok_or_else(|| io::Error::other("the nbd family has no multicast group"))?;
        // SAFETY: a valid socket and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                &group as *const u32 as *const libc::c_void,
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for LINK_DEAD events; returns the device indexes named.
    pub fn next_link_dead(&mut self, timeout: Duration) -> io::Result<Vec<u32>> {
        let tv = nix::sys::time::TimeVal::new(
            timeout.as_secs() as libc::time_t,
            timeout.subsec_micros() as libc::suseconds_t,
        );
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        let mut buf = vec![0u8; 8 * 1024];
        let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        Ok(parse_messages(&buf[..n])?
            .into_iter()
            .filter_map(|m| match m {
                Received::Genl {
                    family,
                    cmd: NBD_CMD_LINK_DEAD,
                    attrs,
                    ..
                } if family == self.family => attr_u32(&attrs, NBD_ATTR_INDEX),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_request_is_laid_out_as_the_kernel_parses_it() {
        let config = DeviceConfig {
            size: 1 << 30,
            block_size: 512,
            server_flags: 0x0d,
            request_timeout: Duration::from_millis(15_500),
            dead_conn_timeout: Duration::from_secs(15),
            backend: "handoff-csi:node-a/vol-x".into(),
        };
        let msg = encode_message(0x1b, NBD_CMD_CONNECT, 1, 7, &connect_attrs(&config, 9));
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x1b);
        assert_eq!(
            u16::from_ne_bytes([msg[6], msg[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(&msg[16..18], &[NBD_CMD_CONNECT, 1]);
        let attrs = parse_attrs(&msg[20..]).unwrap();
        let u64_of = |k| {
            let (_, v) = attrs.iter().find(|(t, _)| *t == k).unwrap();
            u64::from_ne_bytes(v[..8].try_into().unwrap())
        };
        assert_eq!(u64_of(NBD_ATTR_SIZE_BYTES), 1 << 30);
        assert_eq!(u64_of(NBD_ATTR_BLOCK_SIZE_BYTES), 512);
        assert_eq!(u64_of(NBD_ATTR_SERVER_FLAGS), 0x0d);
        // Whole seconds, rounded up and never 0 (0 would mean "no timeout").
        assert_eq!(u64_of(NBD_ATTR_TIMEOUT), 16);
        assert_eq!(u64_of(NBD_ATTR_DEAD_CONN_TIMEOUT), 15);
        let (_, backend) = attrs
            .iter()
            .find(|(t, _)| *t == NBD_ATTR_BACKEND_IDENTIFIER)
            .unwrap();
        assert_eq!(backend.as_slice(), b"handoff-csi:node-a/vol-x\0");
        // SOCKETS → SOCK_ITEM → SOCK_FD, each level nested.
        let raw_type = {
            let mut at = 20;
            loop {
                let len = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
                let t = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]);
                if t & NLA_TYPE_MASK == NBD_ATTR_SOCKETS {
                    break t;
                }
                at += align4(len);
            }
        };
        assert_ne!(raw_type & NLA_F_NESTED, 0);
        let (_, socks) = attrs.iter().find(|(t, _)| *t == NBD_ATTR_SOCKETS).unwrap();
        let items = parse_attrs(socks).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, NBD_SOCK_ITEM);
        let fd = parse_attrs(&items[0].1).unwrap();
        assert_eq!(attr_u32(&fd, NBD_SOCK_FD), Some(9));
    }

    #[test]
    fn acks_errors_and_events_are_told_apart() {
        let mut buf = Vec::new();
        // An error answer for seq 3: -EBUSY.
        let mut err = vec![0u8; NLMSG_HDRLEN + 4 + NLMSG_HDRLEN];
        let len = err.len() as u32;
        err[0..4].copy_from_slice(&len.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[8..12].copy_from_slice(&3u32.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::EBUSY).to_ne_bytes());
        buf.extend_from_slice(&err);
        // A LINK_DEAD event for device 5 of family 0x1b.
        let mut ev = encode_message(
            0x1b,
            NBD_CMD_LINK_DEAD,
            1,
            0,
            &[Attr::U32(NBD_ATTR_INDEX, 5)],
        );
        buf.append(&mut ev);
        let msgs = parse_messages(&buf).unwrap();
        assert_eq!(
            msgs[0],
            Received::Ack {
                seq: 3,
                errno: -libc::EBUSY
            }
        );
        match &msgs[1] {
            Received::Genl {
                family, cmd, attrs, ..
            } => {
                assert_eq!((*family, *cmd), (0x1b, NBD_CMD_LINK_DEAD));
                assert_eq!(attr_u32(attrs, NBD_ATTR_INDEX), Some(5));
            }
            other => panic!("{other:?}"),
        }
        // A length running past the datagram is refused, not read out of bounds.
        let mut broken = encode_message(0x1b, NBD_CMD_LINK_DEAD, 1, 0, &[]);
        broken[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_messages(&broken).is_err());
        let attr = [200u8, 0, 1, 0, 0, 0, 0, 0];
        assert!(parse_attrs(&attr).is_err());
    }
}
