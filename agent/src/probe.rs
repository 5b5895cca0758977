//! `weir probe-once`: one connection or datagram from inside a namespace and cgroup, as a
//! pod process would make it; prints what happened as one JSON line. Used by tests (and
//! by the lab's probes) to exercise socket-level hooks, which only act on processes in
//! the cgroup they are attached to.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::serve::Reply;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    /// connected | refused | timeout | unreachable | error
    pub result: String,
    /// The server's reply, if one was read.
    pub reply: Option<Reply>,
    /// The peer address the socket reports (getpeername for TCP; the reply's source for
    /// UDP, from recvfrom).
    pub peer: Option<String>,
    pub error: Option<String>,
}

fn classify(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => "unreachable",
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => "timeout",
        _ if e.kind() == std::io::ErrorKind::TimedOut
            || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            "timeout"
        }
        _ => "error",
    }
}

fn fail(e: std::io::Error) -> ProbeResult {
    ProbeResult {
        result: classify(&e).into(),
        reply: None,
        peer: None,
        error: Some(e.to_string()),
    }
}

pub fn tcp(to: SocketAddr, timeout: Duration) -> ProbeResult {
    let s = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let peer = s.peer_addr().ok().map(|a| a.to_string());
    let _ = s.set_read_timeout(Some(timeout));
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(n) if n > 0 => ProbeResult {
            result: "connected".into(),
            reply: serde_json::from_str(line.trim()).ok(),
            peer,
            error: None,
        },
        Ok(_) => ProbeResult {
            result: "error".into(),
            reply: None,
            peer,
            error: Some("connection closed without a reply".into()),
        },
        Err(e) => ProbeResult { peer, ..fail(e) },
    }
}

/// One datagram with sendto and one reply with recvfrom (an unconnected UDP socket, as
/// DNS clients often use), or with send/recv on a connected socket.
pub fn udp(to: SocketAddr, timeout: Duration, connected: bool) -> ProbeResult {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("addr");
    let s = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let sent = if connected {
        s.connect(to).and_then(|_| s.send(b"probe\n"))
    } else {
        s.send_to(b"probe\n", to)
    };
    if let Err(e) = sent {
        return fail(e);
    }
    let mut buf = [0u8; 2048];
    let r = if connected {
        s.recv(&mut buf).map(|n| (n, s.peer_addr().ok()))
    } else {
        s.recv_from(&mut buf).map(|(n, a)| (n, Some(a)))
    };
    match r {
        Ok((n, from)) => ProbeResult {
            result: "connected".into(),
            reply: serde_json::from_slice(&buf[..n]).ok(),
            peer: from.map(|a| a.to_string()),
            error: None,
        },
        Err(e) => fail(e),
    }
}

/// Runs the probe and writes the JSON line to stdout.
pub fn run(to: SocketAddr, udp_: bool, connected: bool, timeout: Duration) {
    let r = if udp_ {
        udp(to, timeout, connected)
    } else {
        tcp(to, timeout)
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", serde_json::to_string(&r).expect("serialisable"));
}
