//! `weir lab probe`: connections from a pod, a node or the external client to a pod, a
//! Service, a NodePort or any address, with the result of every attempt.
//!
//! The parent resolves `--from`/`--to` against the lab's state and runs a worker
//! (`weir lab _probe-worker`, a child process) that enters the source's network
//! namespace and, for pods and nodes, the node's cgroup before exec, so that socket-level
//! hooks see it exactly like a pod (or host) process. The worker reads a [`Job`] as JSON
//! on stdin and prints one list of [`Attempt`]s per target on stdout.
//!
//! Results: `connected` (the server's reply was read), `refused` (ECONNREFUSED: a TCP
//! RST, or an ICMP port unreachable on the connected UDP socket), `timeout` (nothing, or
//! a completed handshake with no reply, before `--timeout-ms`), `unreachable`
//! (EHOSTUNREACH / ENETUNREACH), and `error` for anything else (with the message).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    spec::{self, Family},
    topology::{self, EXTERNAL_V4, EXTERNAL_V6, Lab},
};
use crate::serve::Reply;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "UPPERCASE")]
#[value(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Connected,
    Refused,
    Timeout,
    Unreachable,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::Error => "error",
        }
    }
}

/// What a worker is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub protocol: Proto,
    pub timeout_ms: u64,
    pub count: u32,
    /// Source address to bind (the external client's chosen address).
    pub bind: Option<IpAddr>,
    pub source_port: Option<u16>,
    pub targets: Vec<SocketAddr>,
}

/// One connection attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub result: Outcome,
    /// Identity of the server that answered (`namespace/pod`, or an address).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server: Option<String>,
    /// The client address and port the server saw.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client: Option<String>,
    /// Where the connection arrived at the server (TCP).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_local: Option<String>,
    /// The client socket's own address and port.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    /// The peer the client socket reports (TCP: getpeername; UDP: the reply's source):
    /// the Service address when translation is transparent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    pub elapsed_ms: f64,
}

fn errno_outcome(e: &std::io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Outcome::Refused,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => Outcome::Unreachable,
        Some(libc::ETIMEDOUT) => Outcome::Timeout,
        _ if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            Outcome::Timeout
        }
        _ => Outcome::Error,
    }
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn sock_name(fd: i32, peer: bool) -> Option<SocketAddr> {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len)
        } else {
            libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len)
        }
    };
    (rc == 0).then(|| from_storage(&ss)).flatten()
}

fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                IpAddr::V4(u32::from_be(a.sin_addr.s_addr).into()),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            let ip = ip
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(ip));
            Some(SocketAddr::new(ip, u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

/// A socket of `dst`'s family, bound to `bind` if given (SO_REUSEADDR so that a fixed
/// source port can be reused across attempts).
fn open_socket(ty: i32, dst: &SocketAddr, bind: Option<SocketAddr>) -> std::io::Result<OwnedFd> {
    let fam = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = unsafe { libc::socket(fam, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(last_err());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // IP(V6)_RECVERR: ICMP errors that the kernel treats as soft (network or host
    // unreachable for UDP; any ICMP that reaches a TCP socket while connect() holds its
    // lock) are queued on the socket and wake poll(), instead of being dropped and
    // turning an unreachable destination into a timeout.
    let one: libc::c_int = 1;
    let (level, opt) = if dst.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    };
    unsafe { libc::setsockopt(fd.as_raw_fd(), level, opt, &one as *const _ as _, 4) };
    if let Some(b) = bind {
        let one: libc::c_int = 1;
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as _,
                4,
            )
        };
        let (sa, len) = crate::serve::sockaddr(b);
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            return Err(last_err());
        }
    }
    Ok(fd)
}

/// Waits for `events` on `fd` up to `left`; Ok(false) on timeout.
fn wait_fd(fd: i32, events: i16, left: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = left.as_millis().min(i32::MAX as u128) as i32;
    loop {
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = last_err();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(rc > 0);
    }
}

/// Empties the socket's error queue (IP_RECVERR), so that poll() stops reporting it.
fn drain_error_queue(fd: i32) {
    let mut buf = [0u8; 512];
    let mut ctl = [0u8; 512];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = ctl.len();
        if unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) } < 0 {
            return;
        }
    }
}

fn so_error(fd: i32) -> std::io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as _,
            &mut len,
        )
    };
    if err == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(err))
    }
}

fn attempt_from_err(e: &std::io::Error, started: Instant, source: Option<SocketAddr>) -> Attempt {
    let result = errno_outcome(e);
    Attempt {
        result,
        server: None,
        client: None,
        server_local: None,
        source: source.map(|s| s.to_string()),
        peer: None,
        error: (result == Outcome::Error).then(|| e.to_string()),
        elapsed_ms: ms(started),
    }
}

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

fn connect(fd: i32, dst: &SocketAddr) -> std::io::Result<()> {
    let (sa, len) = crate::serve::sockaddr(*dst);
    if unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
        let e = last_err();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(())
}

fn tcp_attempt(dst: SocketAddr, bind: Option<SocketAddr>, timeout: Duration) -> Attempt {
    let started = Instant::now();
    let fd = match open_socket(libc::SOCK_STREAM, &dst, bind) {
        Ok(f) => f,
        Err(e) => return attempt_from_err(&e, started, None),
    };
    let raw = fd.as_raw_fd();
    if let Err(e) = connect(raw, &dst) {
        return attempt_from_err(&e, started, sock_name(raw, false));
    }
    // Until the handshake completes, an error (SO_ERROR also reports soft errors) or the
    // deadline.
    let peer = loop {
        let left = timeout.saturating_sub(started.elapsed());
        match wait_fd(raw, libc::POLLOUT, left) {
            Ok(true) => {}
            Ok(false) => {
                return Attempt {
                    result: Outcome::Timeout,
                    source: sock_name(raw, false).map(|s| s.to_string()),
                    ..attempt_from_err(
                        &std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
                        started,
                        None,
                    )
                };
            }
            Err(e) => return attempt_from_err(&e, started, None),
        }
        if let Err(e) = so_error(raw) {
            return attempt_from_err(&e, started, sock_name(raw, false));
        }
        match sock_name(raw, true) {
            Some(p) => break Some(p),
            // Woken by a queued error that SO_ERROR already consumed: still connecting.
            None => {
                drain_error_queue(raw);
                if started.elapsed() >= timeout {
                    continue;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let source = sock_name(raw, false);
    // Connected: read the server's one-line reply.
    let left = timeout.saturating_sub(started.elapsed());
    let mut line = String::new();
    let read = (|| -> std::io::Result<usize> {
        if !wait_fd(raw, libc::POLLIN, left)? {
            return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        let s = std::net::TcpStream::from(fd.try_clone()?);
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(
            timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1)),
        ))?;
        BufReader::new(&s).read_line(&mut line)
    })();
    let mut a = Attempt {
        result: Outcome::Connected,
        server: None,
        client: None,
        server_local: None,
        source: source.map(|s| s.to_string()),
        peer: peer.map(|s| s.to_string()),
        error: None,
        elapsed_ms: 0.0,
    };
    match read {
        Ok(0) => {
            a.result = Outcome::Error;
            a.error = Some("connection closed without a reply".into());
        }
        Ok(_) => match serde_json::from_str::<Reply>(line.trim()) {
            Ok(r) => {
                a.server = Some(r.server);
                a.client = Some(r.client);
                a.server_local = Some(r.local).filter(|l| !l.is_empty());
            }
            Err(e) => {
                a.result = Outcome::Error;
                a.error = Some(format!("unexpected reply {line:?}: {e}"));
            }
        },
        Err(e) => {
            a.result = errno_outcome(&e);
            if a.result == Outcome::Error {
                a.error = Some(e.to_string());
            } else if a.result == Outcome::Timeout {
                a.error = Some("handshake completed but no reply arrived".into());
            }
        }
    }
    if bind.is_some_and(|b| b.port() != 0) {
        // A fixed source port is reused by the next attempt: close with RST (linger 0)
        // so that no TIME_WAIT holds the 4-tuple.
        let lg = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &lg as *const _ as _,
                std::mem::size_of::<libc::linger>() as u32,
            )
        };
    }
    a.elapsed_ms = ms(started);
    a
}

fn udp_attempt(dst: SocketAddr, bind: Option<SocketAddr>, timeout: Duration) -> Attempt {
    let started = Instant::now();
    let fd = match open_socket(libc::SOCK_DGRAM, &dst, bind) {
        Ok(f) => f,
        Err(e) => return attempt_from_err(&e, started, None),
    };
    let raw = fd.as_raw_fd();
    // A connected socket: an ICMP port unreachable becomes ECONNREFUSED on it.
    if let Err(e) = connect(raw, &dst) {
        return attempt_from_err(&e, started, sock_name(raw, false));
    }
    let source = sock_name(raw, false);
    // The request is resent (on the same socket: the same flow) every quarter of the
    // timeout, so that one lost datagram does not read as a timeout.
    let interval = (timeout / 4).max(Duration::from_millis(50));
    let mut buf = [0u8; 2048];
    loop {
        let msg = b"probe\n";
        if unsafe { libc::send(raw, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return attempt_from_err(&last_err(), started, source);
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        match wait_fd(raw, libc::POLLIN, left.min(interval)) {
            Ok(false) => {
                if started.elapsed() >= timeout {
                    break;
                }
                continue;
            }
            Ok(true) => {}
            Err(e) => return attempt_from_err(&e, started, source),
        }
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                raw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                &mut ss as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            let e = last_err();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                continue;
            }
            return attempt_from_err(&e, started, source);
        }
        let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        let mut a = Attempt {
            result: Outcome::Connected,
            server: None,
            client: None,
            server_local: None,
            source: source.map(|s| s.to_string()),
            peer: from_storage(&ss).map(|s| s.to_string()),
            error: None,
            elapsed_ms: ms(started),
        };
        match serde_json::from_str::<Reply>(text.trim()) {
            Ok(r) => {
                a.server = Some(r.server);
                a.client = Some(r.client);
            }
            Err(e) => {
                a.result = Outcome::Error;
                a.error = Some(format!("unexpected reply {text:?}: {e}"));
            }
        }
        return a;
    }
    Attempt {
        result: Outcome::Timeout,
        server: None,
        client: None,
        server_local: None,
        source: source.map(|s| s.to_string()),
        peer: None,
        error: None,
        elapsed_ms: ms(started),
    }
}

/// Runs a job in the current namespace: targets concurrently (one thread each),
/// attempts to one target one after the other.
pub fn run_job(job: &Job) -> Vec<Vec<Attempt>> {
    let timeout = Duration::from_millis(job.timeout_ms.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = job
            .targets
            .iter()
            .map(|dst| {
                let dst = *dst;
                s.spawn(move || {
                    let bind = match (job.bind, job.source_port) {
                        (None, None) => None,
                        (ip, port) => Some(SocketAddr::new(
                            ip.unwrap_or(if dst.is_ipv4() {
                                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                            } else {
                                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                            }),
                            port.unwrap_or(0),
                        )),
                    };
                    (0..job.count.max(1))
                        .map(|_| match job.protocol {
                            Proto::Tcp => tcp_attempt(dst, bind, timeout),
                            Proto::Udp => udp_attempt(dst, bind, timeout),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Attempt {
                        result: Outcome::Error,
                        server: None,
                        client: None,
                        server_local: None,
                        source: None,
                        peer: None,
                        error: Some("probe thread panicked".into()),
                        elapsed_ms: 0.0,
                    }]
                })
            })
            .collect()
    })
}

/// `weir lab _probe-worker`: a Job on stdin, results on stdout.
pub fn worker_main() -> Result<()> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let job: Job = serde_json::from_str(&text).context("reading the probe job")?;
    let out = run_job(&job);
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out)?;
    stdout.write_all(b"\n")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sources and destinations

/// `--from`: `NS/POD`, `node/NODE`, or `external[:IP][@NODE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Pod(String),
    Node(String),
    External {
        ip: Option<IpAddr>,
        node: Option<String>,
    },
}

/// `--to`: `NS/POD`, `svc/NS/NAME`, `nodeport/NODE/NS/NAME`, `lb/NS/NAME` or an `IP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestSpec {
    Pod(String),
    Service(String),
    NodePort { node: String, service: String },
    LoadBalancer(String),
    Ip(IpAddr),
}

pub fn parse_source(s: &str) -> Result<SourceSpec> {
    if let Some(rest) = s.strip_prefix("external") {
        let (addr, node) = match rest.split_once('@') {
            Some((a, n)) if !n.is_empty() => (a, Some(n.to_string())),
            Some(_) => bail!("--from {s:?}: empty node after '@'"),
            None => (rest, None),
        };
        let ip = match addr {
            "" => None,
            a => {
                let a = a
                    .strip_prefix(':')
                    .with_context(|| format!("--from {s:?}: expected external[:IP][@NODE]"))?;
                let a = a.trim_start_matches('[').trim_end_matches(']');
                Some(
                    a.parse()
                        .with_context(|| format!("--from {s:?}: {a:?} is not an IP address"))?,
                )
            }
        };
        return Ok(SourceSpec::External { ip, node });
    }
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        ["node", n] if !n.is_empty() => Ok(SourceSpec::Node(n.to_string())),
        [ns, pod] if !ns.is_empty() && !pod.is_empty() => Ok(SourceSpec::Pod(s.to_string())),
        _ => bail!("--from {s:?}: expected NS/POD, node/NODE or external[:IP][@NODE]"),
    }
}

pub fn parse_dest(s: &str) -> Result<DestSpec> {
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(DestSpec::Ip(ip));
    }
    let parts: Vec<&str> = s.split('/').collect();
    let ok = |v: &[&str]| v.iter().all(|p| !p.is_empty());
    match parts.as_slice() {
        ["svc", ns, n] if ok(&[ns, n]) => Ok(DestSpec::Service(format!("{ns}/{n}"))),
        ["lb", ns, n] if ok(&[ns, n]) => Ok(DestSpec::LoadBalancer(format!("{ns}/{n}"))),
        ["nodeport", node, ns, n] if ok(&[node, ns, n]) => Ok(DestSpec::NodePort {
            node: node.to_string(),
            service: format!("{ns}/{n}"),
        }),
        [ns, pod] if ok(&[ns, pod]) => Ok(DestSpec::Pod(s.to_string())),
        _ => bail!(
            "--to {s:?}: expected NS/POD, svc/NS/NAME, nodeport/NODE/NS/NAME, lb/NS/NAME or an IP address"
        ),
    }
}

/// A resolved source.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub spec: String,
    /// "pod", "node" or "external".
    pub kind: &'static str,
    pub netns: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The source's address of the destination's family (for external sources: the
    /// address the probe binds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    #[serde(skip)]
    pub addresses: Vec<IpAddr>,
    #[serde(skip)]
    pub external_ip: Option<IpAddr>,
    /// External sources: the node whose address the fabric routes VIPs through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry_node: Option<String>,
    #[serde(skip)]
    pub entry_node_explicit: bool,
}

/// A resolved destination.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Dest {
    pub spec: String,
    /// "pod", "service", "nodePort", "loadBalancer" or "address".
    pub kind: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Proto,
    /// For nodePort destinations: the Service port the nodePort belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
}

fn pick(ips: &[IpAddr], family: Option<Family>, what: &str) -> Result<IpAddr> {
    match family {
        None => ips.first().copied(),
        Some(f) => ips.iter().copied().find(|i| Family::of(i) == f),
    }
    .with_context(|| {
        format!(
            "{what} has no {}address",
            family
                .map(|f| format!("{} ", f.as_str()))
                .unwrap_or_default()
        )
    })
}

pub fn resolve_source(lab: &Lab, spec: &SourceSpec, text: &str) -> Result<Source> {
    let st = &lab.state;
    Ok(match spec {
        SourceSpec::Pod(k) => {
            let w = st.pods.get(k).with_context(|| {
                format!(
                    "--from {text}: no pod {k} (pods: {})",
                    st.pods.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            Source {
                spec: text.into(),
                kind: "pod",
                netns: w.netns.clone(),
                node: Some(w.node.clone()),
                cgroup: st.nodes.get(&w.node).map(|n| n.cgroup.clone()),
                address: None,
                addresses: w.ips.clone(),
                external_ip: None,
                entry_node: None,
                entry_node_explicit: false,
            }
        }
        SourceSpec::Node(n) => {
            let node = st.nodes.get(n).with_context(|| {
                format!(
                    "--from {text}: no node {n} (nodes: {})",
                    st.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            Source {
                spec: text.into(),
                kind: "node",
                netns: node.netns.clone(),
                node: Some(n.clone()),
                cgroup: Some(node.cgroup.clone()),
                address: None,
                addresses: node.ips.clone(),
                external_ip: None,
                entry_node: None,
                entry_node_explicit: false,
            }
        }
        SourceSpec::External { ip, node } => {
            if let Some(n) = node
                && !st.nodes.contains_key(n)
            {
                bail!("--from {text}: no node {n}");
            }
            Source {
                spec: text.into(),
                kind: "external",
                netns: st
                    .external
                    .clone()
                    .context("the lab has no external namespace")?,
                node: None,
                cgroup: None,
                address: None,
                addresses: Vec::new(),
                external_ip: *ip,
                entry_node: node.clone().or_else(|| st.nodes.keys().next().cloned()),
                entry_node_explicit: node.is_some(),
            }
        }
    })
}

pub fn resolve_dest(
    lab: &Lab,
    spec: &DestSpec,
    text: &str,
    port: u16,
    protocol: Proto,
    family: Option<Family>,
) -> Result<Dest> {
    let st = &lab.state;
    let r = st.resolved.as_ref().context("the lab has no objects yet")?;
    let service = |k: &str| {
        r.services.get(k).with_context(|| {
            format!(
                "--to {text}: no Service {k} (services: {})",
                r.services.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    };
    let d = |kind, address, port, service_port| Dest {
        spec: text.into(),
        kind,
        address,
        port,
        protocol,
        service_port,
    };
    Ok(match spec {
        DestSpec::Pod(k) => {
            let w = st
                .pods
                .get(k)
                .with_context(|| format!("--to {text}: no pod {k}"))?;
            d(
                "pod",
                pick(&w.ips, family, &format!("pod {k}"))?,
                port,
                None,
            )
        }
        DestSpec::Service(k) => {
            let ips = spec::service_ips(service(k)?);
            if ips.is_empty() {
                bail!("--to {text}: Service {k} has no clusterIP (headless or ExternalName)");
            }
            d(
                "service",
                pick(&ips, family, &format!("Service {k}"))?,
                port,
                None,
            )
        }
        DestSpec::LoadBalancer(k) => {
            let ips = spec::service_lb_ips(service(k)?);
            if ips.is_empty() {
                bail!("--to {text}: Service {k} has no load balancer ingress IP");
            }
            d(
                "loadBalancer",
                pick(&ips, family, &format!("Service {k}"))?,
                port,
                None,
            )
        }
        DestSpec::NodePort { node, service: k } => {
            let n = st
                .nodes
                .get(node)
                .with_context(|| format!("--to {text}: no node {node}"))?;
            let svc = service(k)?;
            let ports = svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.clone())
                .unwrap_or_default();
            let same_proto = |p: &&k8s_openapi::api::core::v1::ServicePort| {
                p.protocol.as_deref() == Some(protocol.as_str())
            };
            // --port names the Service port (or the nodePort itself).
            let sp = ports
                .iter()
                .filter(same_proto)
                .find(|p| p.port == port as i32)
                .or_else(|| {
                    ports
                        .iter()
                        .filter(same_proto)
                        .find(|p| p.node_port == Some(port as i32))
                })
                .with_context(|| {
                    format!(
                        "--to {text}: Service {k} has no {} port or nodePort {port}",
                        protocol.as_str()
                    )
                })?;
            let np = sp.node_port.filter(|n| *n != 0).with_context(|| {
                format!(
                    "--to {text}: port {} of Service {k} has no nodePort",
                    sp.port
                )
            })?;
            d(
                "nodePort",
                pick(&n.ips, family, &format!("node {node}"))?,
                np as u16,
                Some(sp.port as u16),
            )
        }
        DestSpec::Ip(ip) => d("address", *ip, port, None),
    })
}

/// Whether external traffic to `ip` needs a fabric route through the entry node: load
/// balancer IPs and externalIPs always; any other address that is not already routed
/// (not a node, pod or endpoint address) when the probe names its entry node.
fn needs_entry_route(lab: &Lab, ip: &IpAddr, explicit: bool) -> bool {
    let st = &lab.state;
    let Some(r) = st.resolved.as_ref() else {
        return false;
    };
    let vip = r.services.values().any(|s| {
        spec::service_lb_ips(s).contains(ip) || spec::service_external_ips(s).contains(ip)
    });
    if vip {
        return true;
    }
    let routed = st
        .nodes
        .values()
        .any(|n| n.ips.contains(ip) || n.pod_cidrs.iter().any(|c| c.contains(ip)))
        || st
            .pods
            .values()
            .chain(st.endpoints.values())
            .any(|w| w.ips.contains(ip));
    explicit && !routed
}

/// Runs a worker in `src`'s namespace (and cgroup) for `job`.
pub fn spawn_worker(src: &Source, job: &Job) -> Result<Vec<Vec<Attempt>>> {
    let exe = std::env::current_exe().context("finding the weir binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["lab", "_probe-worker"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    topology::prepare_child(&mut cmd, Some(&src.netns), src.cgroup.as_deref(), false)?;
    let mut child = cmd.spawn().context("starting the probe worker")?;
    {
        let mut stdin = child.stdin.take().context("worker stdin")?;
        serde_json::to_writer(&mut stdin, job)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "probe worker in {} failed ({}): {}",
            src.netns,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Vec<Vec<Attempt>> = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "reading the probe worker's output {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    if v.len() != job.targets.len() {
        bail!(
            "probe worker returned {} results for {} targets",
            v.len(),
            job.targets.len()
        );
    }
    Ok(v)
}

/// Counts per result kind and per answering backend.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub attempts: usize,
    pub connected: usize,
    pub refused: usize,
    pub timeout: usize,
    pub unreachable: usize,
    pub error: usize,
    /// Connected attempts per server identity.
    pub backends: BTreeMap<String, usize>,
}

impl Summary {
    pub fn of(attempts: &[Attempt]) -> Summary {
        let mut s = Summary {
            attempts: attempts.len(),
            ..Default::default()
        };
        for a in attempts {
            match a.result {
                Outcome::Connected => s.connected += 1,
                Outcome::Refused => s.refused += 1,
                Outcome::Timeout => s.timeout += 1,
                Outcome::Unreachable => s.unreachable += 1,
                Outcome::Error => s.error += 1,
            }
            if let Some(srv) = &a.server {
                *s.backends.entry(srv.clone()).or_default() += 1;
            }
        }
        s
    }
}

/// What `weir lab probe` prints.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeReport {
    pub from: Source,
    pub to: Dest,
    pub attempts: Vec<Attempt>,
    pub summary: Summary,
}

/// Options of one probe.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Proto,
    pub count: u32,
    pub timeout_ms: u64,
    pub source_port: Option<u16>,
    pub family: Option<Family>,
}

/// Resolves and runs one probe.
pub fn probe(lab: &Lab, o: &ProbeOptions) -> Result<ProbeReport> {
    let src_spec = parse_source(&o.from)?;
    let dst_spec = parse_dest(&o.to)?;
    let mut src = resolve_source(lab, &src_spec, &o.from)?;
    let dst = resolve_dest(lab, &dst_spec, &o.to, o.port, o.protocol, o.family)?;
    let fam = Family::of(&dst.address);
    src.address = src.addresses.iter().copied().find(|i| Family::of(i) == fam);
    let mut _ext_lock = None;
    let mut bind = None;
    if src.kind == "external" {
        let ip = match src.external_ip {
            Some(ip) => ip,
            None => match fam {
                Family::IPv4 => EXTERNAL_V4.parse()?,
                Family::IPv6 => EXTERNAL_V6.parse()?,
            },
        };
        if Family::of(&ip) != fam {
            bail!(
                "--from {}: source {ip} and destination {} are of different IP families",
                o.from,
                dst.address
            );
        }
        // Probes from outside change the fabric's routes; one at a time per lab.
        _ext_lock = Some(lock_file(&lab.dir.join("external.lock"))?);
        lab.ensure_external_source(&ip)?;
        if needs_entry_route(lab, &dst.address, src.entry_node_explicit)
            && let Some(n) = &src.entry_node
        {
            lab.route_via_node(&dst.address, n)?;
        }
        src.address = Some(ip);
        bind = Some(ip);
    }
    let job = Job {
        protocol: o.protocol,
        timeout_ms: o.timeout_ms,
        count: o.count.max(1),
        bind,
        source_port: o.source_port,
        targets: vec![SocketAddr::new(dst.address, dst.port)],
    };
    let attempts = spawn_worker(&src, &job)?.pop().unwrap_or_default();
    let summary = Summary::of(&attempts);
    Ok(ProbeReport {
        from: src,
        to: dst,
        attempts,
        summary,
    })
}

fn lock_file(path: &std::path::Path) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {}: {}", path.display(), last_err());
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(parse_source("x/a").unwrap(), SourceSpec::Pod("x/a".into()));
        assert_eq!(
            parse_source("node/n1").unwrap(),
            SourceSpec::Node("n1".into())
        );
        assert_eq!(
            parse_source("external").unwrap(),
            SourceSpec::External {
                ip: None,
                node: None
            }
        );
        assert_eq!(
            parse_source("external:203.0.113.9@n2").unwrap(),
            SourceSpec::External {
                ip: Some("203.0.113.9".parse().unwrap()),
                node: Some("n2".into())
            }
        );
        assert_eq!(
            parse_source("external:[2001:db8::5]").unwrap(),
            SourceSpec::External {
                ip: Some("2001:db8::5".parse().unwrap()),
                node: None
            }
        );
        assert_eq!(
            parse_source("external@n1").unwrap(),
            SourceSpec::External {
                ip: None,
                node: Some("n1".into())
            }
        );
        for bad in ["x", "x/a/b", "external:nope", "external@", "/a"] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(parse_dest("x/a").unwrap(), DestSpec::Pod("x/a".into()));
        assert_eq!(
            parse_dest("svc/x/web").unwrap(),
            DestSpec::Service("x/web".into())
        );
        assert_eq!(
            parse_dest("nodeport/n1/x/web").unwrap(),
            DestSpec::NodePort {
                node: "n1".into(),
                service: "x/web".into()
            }
        );
        assert_eq!(
            parse_dest("lb/x/web").unwrap(),
            DestSpec::LoadBalancer("x/web".into())
        );
        assert_eq!(
            parse_dest("10.0.0.1").unwrap(),
            DestSpec::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_dest("fd00::1").unwrap(),
            DestSpec::Ip("fd00::1".parse().unwrap())
        );
        // Two parts are always NS/POD, even in a namespace called "svc".
        assert_eq!(parse_dest("svc/x").unwrap(), DestSpec::Pod("svc/x".into()));
        for bad in ["x", "nodeport/n/x", "a/b/c", "svc//x"] {
            assert!(parse_dest(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn summary_counts_results_and_backends() {
        let a = |r, s: Option<&str>| Attempt {
            result: r,
            server: s.map(str::to_string),
            client: None,
            server_local: None,
            source: None,
            peer: None,
            error: None,
            elapsed_ms: 0.0,
        };
        let s = Summary::of(&[
            a(Outcome::Connected, Some("x/a")),
            a(Outcome::Connected, Some("x/b")),
            a(Outcome::Connected, Some("x/a")),
            a(Outcome::Timeout, None),
        ]);
        assert_eq!((s.attempts, s.connected, s.timeout), (4, 3, 1));
        assert_eq!(s.backends["x/a"], 2);
        assert_eq!(
            serde_json::to_value(Outcome::Unreachable).unwrap(),
            "unreachable"
        );
    }

    /// Real sockets on loopback (no namespace needed): a closed port is refused, a
    /// served one connected.
    #[test]
    fn loopback_refused_and_connected() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, peer) = l.accept().unwrap();
            let r = Reply {
                server: "test/srv".into(),
                client: peer.to_string(),
                local: addr.to_string(),
            };
            s.write_all(r.line().as_bytes()).unwrap();
        });
        let a = tcp_attempt(addr, None, Duration::from_secs(2));
        t.join().unwrap();
        assert_eq!(a.result, Outcome::Connected, "{a:?}");
        assert_eq!(a.server.as_deref(), Some("test/srv"));
        assert_eq!(a.client, a.source);
        // The listener is gone: the port is closed now.
        let a = tcp_attempt(addr, None, Duration::from_secs(2));
        assert_eq!(a.result, Outcome::Refused, "{a:?}");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uaddr = u.local_addr().unwrap();
        drop(u);
        let a = udp_attempt(uaddr, None, Duration::from_secs(2));
        assert_eq!(a.result, Outcome::Refused, "{a:?}");
    }
}
