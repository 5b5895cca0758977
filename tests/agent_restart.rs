//! Agent restarts drop nothing, with real packets: the agent (a real process) is killed
//! with SIGKILL while TCP connections through a ClusterIP are open and new ones keep
//! arriving; the datapath keeps forwarding from its pinned maps and links; a new agent
//! adopts them and converges. Every request on the open connections is answered by the
//! backend it had before, and every new connection succeeds: zero failed or reset
//! connections.
//!
//! Topology: `weir::demo::Mini` (one node namespace, a client pod and two backend pods,
//! real `weir serve` servers). The two-node lab version, killing both nodes' agents, is
//! `sigkill_of_the_agents_drops_no_connection` in tests/lab_services.rs.

mod support;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use weir::{
    agent::GENERATION_FILE,
    demo::{Mini, VIP},
    serve::Reply,
};

#[derive(Default)]
struct Tally {
    new_ok: AtomicUsize,
    new_failed: AtomicUsize,
    requests_ok: AtomicUsize,
    requests_failed: AtomicUsize,
    /// A kept connection answered by a different backend than before.
    moved: AtomicUsize,
}

fn read_reply(s: &TcpStream) -> std::io::Result<Reply> {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    serde_json::from_str(line.trim()).map_err(std::io::Error::other)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_restart_drops_no_connection() {
    support::require_root();
    let mut m = Mini::build(std::path::Path::new(env!("CARGO_BIN_EXE_weir"))).expect("topology");
    m.start_agent().expect("agent starts");
    m.wait_programmed(1, Duration::from_secs(30))
        .expect("agent programs the Service");
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let client_ns = m.pod("client").ns.name.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());

    // Kept connections: a request every 20 ms each, answered by the same backend.
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (ns, stop, tally) = (client_ns.clone(), stop.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            weir::netns::enter(&ns).unwrap();
            let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let first = read_reply(&s).unwrap().server;
            while !stop.load(Ordering::Relaxed) {
                let ok = (&s).write_all(b"ping\n").is_ok()
                    && match read_reply(&s) {
                        Ok(r) => {
                            if r.server != first {
                                tally.moved.fetch_add(1, Ordering::Relaxed);
                            }
                            true
                        }
                        Err(_) => false,
                    };
                let c = if ok {
                    &tally.requests_ok
                } else {
                    &tally.requests_failed
                };
                c.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // New connections, one after another.
    {
        let (ns, stop, tally) = (client_ns.clone(), stop.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            weir::netns::enter(&ns).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let ok = TcpStream::connect_timeout(&vip, Duration::from_secs(2))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        read_reply(&s)
                    })
                    .is_ok();
                let c = if ok { &tally.new_ok } else { &tally.new_failed };
                c.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }

    wait_for("traffic before the kill", Duration::from_secs(30), || {
        tally.new_ok.load(Ordering::Relaxed) >= 30
            && tally.requests_ok.load(Ordering::Relaxed) >= 30
    });

    // SIGKILL: no exit handler runs, the pins stay.
    let mut agent = m.agent.take().expect("agent");
    agent.child.kill().expect("SIGKILL");
    agent.child.wait().unwrap();
    let at_kill = (
        tally.new_ok.load(Ordering::Relaxed),
        tally.requests_ok.load(Ordering::Relaxed),
    );
    // Traffic keeps flowing with no agent at all.
    wait_for("traffic without an agent", Duration::from_secs(30), || {
        tally.new_ok.load(Ordering::Relaxed) >= at_kill.0 + 30
            && tally.requests_ok.load(Ordering::Relaxed) >= at_kill.1 + 30
    });

    // A new agent adopts the pinned maps and links; generation 2 tells us it synced.
    std::fs::write(m.dir.join(GENERATION_FILE), "2").unwrap();
    m.start_agent().expect("agent restarts");
    m.wait_programmed(2, Duration::from_secs(30))
        .expect("the restarted agent converges");
    let at_restart = (
        tally.new_ok.load(Ordering::Relaxed),
        tally.requests_ok.load(Ordering::Relaxed),
    );
    wait_for("traffic after the restart", Duration::from_secs(30), || {
        tally.new_ok.load(Ordering::Relaxed) >= at_restart.0 + 30
            && tally.requests_ok.load(Ordering::Relaxed) >= at_restart.1 + 30
    });
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let failed = (
        tally.new_failed.load(Ordering::Relaxed),
        tally.requests_failed.load(Ordering::Relaxed),
        tally.moved.load(Ordering::Relaxed),
    );
    eprintln!(
        "new connections: {} ok, {} failed; requests on kept connections: {} ok, {} failed, {} moved",
        tally.new_ok.load(Ordering::Relaxed),
        failed.0,
        tally.requests_ok.load(Ordering::Relaxed),
        failed.1,
        failed.2
    );
    assert_eq!(
        failed,
        (0, 0, 0),
        "(new failed, requests failed, moved backend)"
    );
}
