//! Socket-level load balancing with real sockets: the agent attaches the cgroup hooks to
//! the node's cgroup; client processes in a pod namespace and in that cgroup connect to a
//! ClusterIP and are connected straight to a backend (no per-packet translation: the
//! datapath's translation counter stays at zero), while the socket reports the VIP as its
//! peer. Unconnected and connected UDP likewise; a Service without endpoints refuses at
//! once.

mod support;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use weir::demo::{Mini, VIP};
use weir_common::metrics::{DIR_EGRESS, REASON_TRANSLATED, index};

fn translated_per_packet(m: &Mini) -> u64 {
    weir::datapath::maps::read_counters(&m.pin_dir)
        .unwrap()
        .get(&index(REASON_TRANSLATED, DIR_EGRESS))
        .map(|c| c.packets)
        .unwrap_or(0)
}

fn mini() -> Mini {
    support::require_root();
    let mut m = Mini::build(std::path::Path::new(env!("CARGO_BIN_EXE_weir"))).expect("topology");
    m.with_socket_lb().expect("cgroup");
    m.start_agent().expect("agent");
    m.wait_programmed(1, Duration::from_secs(30))
        .expect("programmed");
    m
}

#[test]
fn tcp_to_a_clusterip_is_balanced_at_connect_and_the_peer_is_the_vip() {
    let m = mini();
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let mut backends = BTreeSet::new();
    for _ in 0..30 {
        let r = m.probe("client", vip, false, false).unwrap();
        assert_eq!(r.result, "connected", "{r:?}");
        assert_eq!(
            r.peer.as_deref(),
            Some("10.96.0.10:80"),
            "getpeername shows the VIP"
        );
        let reply = r.reply.unwrap();
        assert_eq!(reply.local.split(':').next_back(), Some("8080"));
        backends.insert(reply.server);
    }
    assert_eq!(backends.len(), 2, "both backends: {backends:?}");
    assert_eq!(
        translated_per_packet(&m),
        0,
        "translated by the socket hooks, not per packet"
    );
}

#[test]
fn udp_to_a_clusterip_unconnected_and_connected_sees_the_vip() {
    let m = mini();
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    for connected in [false, true] {
        let r = m.probe("client", vip, true, connected).unwrap();
        assert_eq!(r.result, "connected", "{r:?}");
        assert_eq!(
            r.peer.as_deref(),
            Some("10.96.0.10:53"),
            "recvfrom/getpeername show the VIP ({connected})"
        );
        assert!(r.reply.unwrap().server.starts_with("demo/backend-"));
    }
    assert_eq!(translated_per_packet(&m), 0);
}

#[test]
fn a_clusterip_without_endpoints_refuses_at_connect() {
    let m = mini();
    let r = m
        .probe("client", "10.96.0.11:80".parse().unwrap(), false, false)
        .unwrap();
    assert_eq!(r.result, "refused", "{r:?}");
}

#[test]
fn without_socket_lb_the_per_packet_path_translates() {
    support::require_root();
    let mut m = Mini::build(std::path::Path::new(env!("CARGO_BIN_EXE_weir"))).expect("topology");
    m.start_agent().unwrap();
    m.wait_programmed(1, Duration::from_secs(30)).unwrap();
    let r = m
        .probe("client", format!("{VIP}:80").parse().unwrap(), false, false)
        .unwrap();
    assert_eq!(r.result, "connected");
    assert_eq!(r.peer.as_deref(), Some("10.96.0.10:80"));
    assert!(
        translated_per_packet(&m) > 0,
        "the TC path did the translation"
    );
    let r = m
        .probe("client", "10.96.0.11:80".parse().unwrap(), false, false)
        .unwrap();
    assert_eq!(r.result, "refused", "per-packet reject (TCP RST): {r:?}");
}

/// Runs `f` with this test process in `cg` (a socket belongs to the cgroup of the
/// process that made it, for good), then moves the process back.
fn in_cgroup<T>(cg: &std::path::Path, f: impl FnOnce() -> T) -> T {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 membership");
    let back = cg.parent().unwrap().join(rel.trim_start_matches('/'));
    std::fs::write(cg.join("cgroup.procs"), b"0").unwrap();
    let r = f();
    std::fs::write(back.join("cgroup.procs"), b"0").unwrap();
    r
}

fn reply_of(line: &[u8]) -> weir::serve::Reply {
    serde_json::from_slice(line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// A connected UDP socket (a resolver's socket to CoreDNS) or a TCP connection that the
/// connect hook pointed at a backend would keep talking to it after it is removed, since
/// no packet of it passes the per-packet path: the agent destroys those sockets (their
/// owner sees ECONNABORTED and reconnects), and only those: sockets to the backend that
/// remains keep working.
#[test]
fn sockets_connected_to_a_removed_backend_are_destroyed() {
    use std::{
        io::{BufRead, BufReader, Write},
        net::{TcpStream, UdpSocket},
    };
    let mut m = mini();
    let cg = m.cgroup.as_ref().unwrap().path.clone();
    let ns = m.pod("client").ns.name.clone();
    let dns: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let http: SocketAddr = format!("{VIP}:80").parse().unwrap();
    // Enough sockets that both backends have some of each kind.
    let (udps, tcps) = in_cgroup(&cg, || {
        weir::netns::in_netns(&ns, move || {
            let u: Vec<UdpSocket> = (0..12)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.connect(dns).unwrap();
                    s
                })
                .collect();
            let t: Vec<TcpStream> = (0..12)
                .map(|_| TcpStream::connect_timeout(&http, Duration::from_secs(2)).unwrap())
                .collect();
            (u, t)
        })
        .unwrap()
    });
    let udp_server = |s: &UdpSocket| -> std::io::Result<String> {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send(b"q\n")?;
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf)?;
        Ok(reply_of(&buf[..n]).server)
    };
    let tcp_server = |s: &TcpStream| -> std::io::Result<String> {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        (&*s).write_all(b"q\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(reply_of(line.as_bytes()).server)
    };
    let mut before = Vec::new();
    for s in &tcps {
        // The greeting the server sends on accept, then one request.
        let mut line = String::new();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        BufReader::new(s).read_line(&mut line).unwrap();
        before.push(("tcp", tcp_server(s).unwrap()));
    }
    for s in &udps {
        before.push(("udp", udp_server(s).unwrap()));
    }
    for kind in ["tcp", "udp"] {
        for b in ["demo/backend-1", "demo/backend-2"] {
            assert!(
                before.iter().any(|(k, s)| *k == kind && s == b),
                "some {kind} socket on {b}: {before:?}"
            );
        }
    }

    // backend-1 leaves the EndpointSlice.
    let path = m.dir.join("objects.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let gone = "- addresses: [10.244.1.3]\n  conditions: {ready: true}\n  nodeName: demo-node\n  targetRef: {kind: Pod, namespace: demo, name: backend-1}\n";
    assert_eq!(yaml.matches(gone).count(), 1, "{yaml}");
    std::fs::write(&path, yaml.replace(gone, "")).unwrap();
    std::fs::write(m.dir.join(weir::agent::GENERATION_FILE), "2").unwrap();
    m.wait_programmed(2, Duration::from_secs(30)).unwrap();

    // The agent destroys the sockets after the sync; the owner finds ECONNABORTED
    // pending on them (SO_ERROR), without having to send anything.
    let all: Vec<(&str, &String, std::os::fd::BorrowedFd)> = tcps
        .iter()
        .map(|s| ("tcp", std::os::fd::AsFd::as_fd(s)))
        .chain(udps.iter().map(|s| ("udp", std::os::fd::AsFd::as_fd(s))))
        .zip(before.iter())
        .map(|((k, fd), (_, b))| (k, b, fd))
        .collect();
    let so_error = |fd: &std::os::fd::BorrowedFd| -> i32 {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v
    };
    let mut aborted = vec![false; all.len()];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && all
            .iter()
            .zip(&aborted)
            .any(|((_, b, _), a)| *b == "demo/backend-1" && !a)
    {
        for (i, (_, _, fd)) in all.iter().enumerate() {
            if !aborted[i] {
                let e = so_error(fd);
                assert!(e == 0 || e == libc::ECONNABORTED, "unexpected error {e}");
                aborted[i] = e == libc::ECONNABORTED;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, (kind, was, _)) in all.iter().enumerate() {
        assert_eq!(
            aborted[i],
            *was == "demo/backend-1",
            "{kind} socket on {was}: destroyed iff its backend was removed"
        );
    }
    // A destroyed UDP socket is unconnected: sending fails loudly instead of vanishing.
    for (s, (_, b)) in udps.iter().zip(&before[tcps.len()..]) {
        let r = udp_server(s);
        if b == "demo/backend-1" {
            let e = r.expect_err("destroyed UDP socket");
            assert_eq!(e.raw_os_error(), Some(libc::EDESTADDRREQ), "{e}");
        } else {
            assert_eq!(
                r.unwrap(),
                "demo/backend-2",
                "untouched socket keeps working"
            );
        }
    }
    for (s, (_, b)) in tcps.iter().zip(&before) {
        if b == "demo/backend-2" {
            assert_eq!(tcp_server(s).unwrap(), "demo/backend-2");
        } else {
            assert!(tcp_server(s).is_err(), "destroyed TCP socket");
        }
    }
    // New sockets reach the remaining backend.
    let r = m.probe("client", dns, true, true).unwrap();
    assert_eq!(r.reply.unwrap().server, "demo/backend-2");
}
