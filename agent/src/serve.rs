//! `weir serve`: the tiny server every lab pod and endpoint runs. On every TCP connection
//! and every UDP datagram it answers one JSON line naming itself and the client address
//! and port it saw, which is what probes use to tell backends apart and to check source
//! addresses. TCP connections stay open for further request lines (each answered the same
//! way), so the same server serves kept-alive request/response benchmarks.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UdpSocket},
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// Identity of the server (`namespace/name` of a pod, or a bare address).
    pub server: String,
    /// The client address and port as the server saw them.
    pub client: String,
    /// The local address and port the connection arrived on.
    pub local: String,
}

impl Reply {
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("serialisable");
        s.push('\n');
        s
    }
}

pub async fn serve(
    identity: String,
    bind: Vec<std::net::IpAddr>,
    tcp: Vec<u16>,
    udp: Vec<u16>,
) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let binds = if bind.is_empty() {
        vec!["::".parse().expect("addr")]
    } else {
        bind
    };
    for addr in &binds {
        for p in &tcp {
            let l = bind_tcp(SocketAddr::new(*addr, *p))
                .with_context(|| format!("binding TCP {addr}:{p}"))?;
            let id = identity.clone();
            tasks.spawn(async move {
                loop {
                    let Ok((s, peer)) = l.accept().await else {
                        continue;
                    };
                    let id = id.clone();
                    tokio::spawn(async move {
                        let local = s
                            .local_addr()
                            .map(|a| canon(a).to_string())
                            .unwrap_or_default();
                        let reply = Reply {
                            server: id,
                            client: canon(peer).to_string(),
                            local,
                        }
                        .line();
                        let (r, mut w) = s.into_split();
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        let mut lines = BufReader::new(r).lines();
                        while let Ok(Some(_)) = lines.next_line().await {
                            if w.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        for p in &udp {
            let s = bind_udp(SocketAddr::new(*addr, *p))
                .with_context(|| format!("binding UDP {addr}:{p}"))?;
            let id = identity.clone();
            tasks.spawn(async move {
                let mut buf = [0u8; 2048];
                loop {
                    let Ok((_, peer)) = s.recv_from(&mut buf).await else {
                        continue;
                    };
                    let reply = Reply {
                        server: id.clone(),
                        client: canon(peer).to_string(),
                        local: String::new(),
                    }
                    .line();
                    let _ = s.send_to(reply.as_bytes(), peer).await;
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// v4-mapped peers of a dual-stack socket are shown as plain IPv4.
fn canon(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        a => a,
    }
}

fn socket_for(addr: SocketAddr, ty: libc::c_int) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = unsafe { libc::socket(fam, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let zero: libc::c_int = 0;
    unsafe {
        libc::setsockopt(
            fd_raw(&fd),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as _,
            4,
        );
        if fam == libc::AF_INET6 {
            // Dual-stack: one socket on :: serves IPv4 too.
            libc::setsockopt(
                fd_raw(&fd),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                &zero as *const _ as _,
                4,
            );
        }
    }
    let (sa, len) = sockaddr(addr);
    if unsafe { libc::bind(fd_raw(&fd), &sa as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd)
}

fn fd_raw(fd: &std::os::fd::OwnedFd) -> i32 {
    use std::os::fd::AsRawFd as _;
    fd.as_raw_fd()
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let fd = socket_for(addr, libc::SOCK_STREAM)?;
    if unsafe { libc::listen(fd_raw(&fd), 1024) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let std_l = std::net::TcpListener::from(fd);
    Ok(TcpListener::from_std(std_l)?)
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let fd = socket_for(addr, libc::SOCK_DGRAM)?;
    Ok(UdpSocket::from_std(std::net::UdpSocket::from(fd))?)
}
