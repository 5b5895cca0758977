//! The kernel's socket diagnostics over netlink (`NETLINK_SOCK_DIAG`, linux/inet_diag.h):
//! list the TCP or UDP sockets of the current network namespace, and destroy one
//! (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY, which this kernel has). A destroyed socket
//! reports `ECONNABORTED` to its owner: what Cilium does (and kube-proxy's conntrack
//! cleanup approximates) when a socket-level-balanced connection's backend goes away.
//!
//! Written against the uapi headers; only the request and reply shapes used here.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Every TCP state (bit per `TCP_*` state), so a dump or a destroy never misses one.
const ALL_STATES: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order, the cookie as
/// two host-order halves (low first; sock_diag_save_cookie).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct SockId {
    pub sport_be: u16,
    pub dport_be: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ifindex: u32,
    pub cookie: [u32; 2],
}

impl SockId {
    pub fn cookie(&self) -> u64 {
        self.cookie[0] as u64 | (self.cookie[1] as u64) << 32
    }
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg` (the part before the attributes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const _: () = assert!(size_of::<SockId>() == 48);
const _: () = assert!(size_of::<DiagReq>() == 56);
const _: () = assert!(size_of::<DiagMsg>() == 72);

/// One socket of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sock {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub protocol: u8,
    pub state: u8,
    pub id: SockId,
}

struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // Safety: the types passed are repr(C) plain data without padding holes that matter
    // to the kernel (every field is initialised by Default).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

fn read<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() < size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // Safety: length checked; T is plain data.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, size_of::<T>())
    };
    Some(v)
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    fn send(&mut self, ty: u16, flags: u16, req: &DiagReq) -> io::Result<u32> {
        self.seq += 1;
        let hdr = NlMsgHdr {
            len: (size_of::<NlMsgHdr>() + size_of::<DiagReq>()) as u32,
            ty,
            flags,
            seq: self.seq,
            pid: 0,
        };
        let mut buf = Vec::with_capacity(hdr.len as usize);
        buf.extend_from_slice(as_bytes(&hdr));
        buf.extend_from_slice(as_bytes(req));
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads replies to `seq` until DONE (dump) or an ERROR/ACK; calls `f` with each
    /// message's type and payload.
    fn recv(&mut self, seq: u32, mut f: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut b = &buf[..n as usize];
            while let Some(h) = read::<NlMsgHdr>(b) {
                let len = h.len as usize;
                if len < size_of::<NlMsgHdr>() || len > b.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &b[size_of::<NlMsgHdr>()..len];
                if h.seq == seq {
                    match h.ty {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            // struct nlmsgerr: a negative errno, 0 for an ACK.
                            let err = read::<i32>(payload).unwrap_or(-libc::EIO);
                            return if err == 0 {
                                Ok(())
                            } else {
                                Err(io::Error::from_raw_os_error(-err))
                            };
                        }
                        t => f(t, payload),
                    }
                }
                // Messages are 4-byte aligned (NLMSG_ALIGN).
                let next = (len + 3) & !3;
                b = &b[next.min(b.len())..];
            }
        }
    }
}

/// Every socket of `protocol` (`IPPROTO_TCP`/`IPPROTO_UDP`) and `family` in the calling
/// thread's network namespace.
pub fn dump(family: u8, protocol: u8) -> io::Result<Vec<Sock>> {
    let mut nl = Netlink::open()?;
    let req = DiagReq {
        family,
        protocol,
        states: ALL_STATES,
        ..Default::default()
    };
    let seq = nl.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
    let mut out = Vec::new();
    nl.recv(seq, |ty, p| {
        if ty == SOCK_DIAG_BY_FAMILY
            && let Some(m) = read::<DiagMsg>(p)
        {
            out.push(Sock {
                family: m.family,
                protocol,
                state: m.state,
                id: m.id,
            });
        }
    })?;
    Ok(out)
}

/// Destroys one socket of a dump (the kernel finds it by its tuple and checks the
/// cookie, so a socket closed and reused meanwhile is not touched: ENOENT).
pub fn destroy(s: &Sock) -> io::Result<()> {
    let mut nl = Netlink::open()?;
    let req = DiagReq {
        family: s.family,
        protocol: s.protocol,
        states: ALL_STATES,
        id: s.id,
        ..Default::default()
    };
    let seq = nl.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    nl.recv(seq, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

    /// Dumps this namespace's UDP sockets and finds one it just made, by its port and
    /// cookie-bearing id, then destroys it and sees ECONNABORTED. Needs root only for
    /// the destroy (CAP_NET_ADMIN); the dump works unprivileged.
    #[test]
    fn a_dumped_udp_socket_is_found_and_destroyed() {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        s.connect(peer.local_addr().unwrap()).unwrap();
        let port = s.local_addr().unwrap().port();
        let socks = dump(libc::AF_INET as u8, libc::IPPROTO_UDP as u8).unwrap();
        let me = socks
            .iter()
            .find(|x| u16::from_be(x.id.sport_be) == port)
            .expect("our socket in the dump");
        let SocketAddr::V4(p) = peer.local_addr().unwrap() else {
            unreachable!()
        };
        assert_eq!(u16::from_be(me.id.dport_be), p.port());
        assert_eq!(&me.id.dst[..4], &p.ip().octets());
        assert_ne!(me.id.cookie(), 0);
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        destroy(me).unwrap();
        let e = s.take_error().unwrap().expect("an error is pending");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
        let e = s.send(b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EDESTADDRREQ), "{e}");
        // Aborted means disconnected: the next dump shows no peer.
        let again = dump(libc::AF_INET as u8, libc::IPPROTO_UDP as u8).unwrap();
        let me2 = again
            .iter()
            .find(|x| x.id.cookie() == me.id.cookie())
            .unwrap();
        assert_eq!(me2.id.dport_be, 0);
    }
}
