//! Housekeeping of kernel state the sync loop does not own: expired conntrack entries,
//! and sockets that socket-level load balancing connected to a backend that is gone.
//!
//! Conntrack: `CT` is an LRU hash, so a full table never refuses a new flow, but without
//! a sweep a busy node keeps idle entries until they are evicted under pressure, and
//! evictions take live entries too. The sweep deletes every entry idle past its
//! timeout (`CtEntry::expired`, Cilium's default timeouts), re-reading each one just
//! before deleting it so that a flow that came back to life in between is kept.
//!
//! Sockets: the cgroup connect hook writes the backend into the socket itself, so the
//! per-packet path never sees those flows and cannot move or reset them. When the
//! backend goes away, a connected UDP socket (a resolver's socket to CoreDNS, the
//! classic kube-proxy blackhole) would keep sending to a dead address forever, and a TCP
//! socket would hang until its own timeouts. As Cilium does, such sockets are destroyed
//! (`SOCK_DESTROY`): their owner sees `ECONNABORTED` and reconnects, through the hook,
//! to a live backend. The rules follow the per-packet path's (flow.rs): a UDP socket
//! moves once its backend stops serving; a TCP socket is left to drain while its
//! backend exists (terminating) and destroyed once it is removed.
//!
//! The sockets live in pod namespaces, so the sweep visits the agent's own and each pod
//! namespace once (found through the socket-LB cgroup's processes and /run/netns), and
//! only when some reverse entry names a backend that is gone: cookies are unique per
//! boot, so a socket of another namespace is never mistaken for one of ours.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use tracing::{debug, info, warn};
use weir_common::{
    Addr,
    ct::{CtEntry, CtKey},
    lb::{BE_F_SERVING, Backend},
    maps as names, proto,
    sock::{SockRevKey, SockRevValue},
};

use super::{maps::open_pinned, sockdiag};

/// Keys of the entries idle past their timeout at `now_ns` (CLOCK_MONOTONIC, the clock
/// of `bpf_ktime_get_ns`).
pub fn expired(entries: impl IntoIterator<Item = (CtKey, CtEntry)>, now_ns: u64) -> Vec<CtKey> {
    entries
        .into_iter()
        .filter(|(k, e)| e.expired(k.proto, now_ns))
        .map(|(k, _)| k)
        .collect()
}

/// What one conntrack sweep saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtSweep {
    pub scanned: u64,
    pub deleted: u64,
    /// Entries left, by IP protocol number.
    pub remaining: BTreeMap<u8, u64>,
}

/// Deletes the expired entries of a CT map.
pub fn sweep_conntrack(ct: &mut BpfHashMap<MapData, CtKey, CtEntry>, now_ns: u64) -> CtSweep {
    let mut all = Vec::new();
    // An entry can vanish (LRU eviction) or appear while iterating: iteration errors on
    // one key end the pass, what was read is still swept.
    for r in ct.iter() {
        match r {
            Ok(kv) => all.push(kv),
            Err(e) => {
                debug!(error = %e, "conntrack iteration ended early");
                break;
            }
        }
    }
    let mut s = CtSweep {
        scanned: all.len() as u64,
        ..Default::default()
    };
    for (k, _) in &all {
        *s.remaining.entry(k.proto).or_default() += 1;
    }
    let seen: HashMap<CtKey, u64> = all.iter().map(|(k, e)| (*k, e.last_seen_ns)).collect();
    for k in expired(all, now_ns) {
        // Re-read: a packet may have refreshed it since the scan.
        let still = ct
            .get(&k, 0)
            .map(|e| Some(&e.last_seen_ns) == seen.get(&k))
            .unwrap_or(false);
        if still && ct.remove(&k).is_ok() {
            s.deleted += 1;
            if let Some(n) = s.remaining.get_mut(&k.proto) {
                *n -= 1;
            }
        }
    }
    s
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A socket the hooks connected to `backend:port_be` whose backend is gone for
/// `protocol` (TCP: removed; UDP: removed or no longer serving).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleTarget {
    pub cookie: u64,
    pub backend: Addr,
    pub port_be: u16,
    pub protocol: u8,
}

/// The socket-LB reverse entries whose backend is gone, per protocol. Pure: `backends`
/// is the content of `BACKENDS`.
pub fn stale_targets(
    rev: impl IntoIterator<Item = SockRevKey>,
    backends: impl IntoIterator<Item = Backend>,
) -> BTreeSet<StaleTarget> {
    // (address, port, protocol) -> serving (any of its backend entries).
    let mut live: HashMap<(Addr, u16, u8), bool> = HashMap::new();
    for b in backends {
        *live.entry((b.addr, b.port_be, b.proto)).or_default() |= b.flags & BE_F_SERVING != 0;
    }
    let mut out = BTreeSet::new();
    for k in rev {
        for protocol in [proto::TCP, proto::UDP] {
            let stale = match live.get(&(k.backend, k.port_be, protocol)) {
                None => true,
                Some(serving) => protocol == proto::UDP && !serving,
            };
            if stale {
                out.insert(StaleTarget {
                    cookie: k.cookie,
                    backend: k.backend,
                    port_be: k.port_be,
                    protocol,
                });
            }
        }
    }
    out
}

fn sock_peer(s: &sockdiag::Sock) -> Addr {
    if s.family == libc::AF_INET as u8 {
        let o = &s.id.dst;
        Addr::from_ipv4(std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3]))
    } else {
        Addr::from_ip(std::net::Ipv6Addr::from(s.id.dst).into())
    }
}

/// Destroys, in the calling thread's namespace, the sockets matching `targets` (by
/// cookie, protocol and connected peer: an unconnected UDP socket that merely sent to a
/// dead backend once has no peer and is left alone). Returns the targets destroyed.
pub fn destroy_in_current_netns(targets: &BTreeSet<StaleTarget>) -> Vec<StaleTarget> {
    let by_cookie: HashMap<u64, Vec<&StaleTarget>> =
        targets.iter().fold(HashMap::new(), |mut m, t| {
            m.entry(t.cookie).or_default().push(t);
            m
        });
    let mut done = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for protocol in [proto::TCP, proto::UDP] {
            let socks = match sockdiag::dump(family, protocol) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, family, protocol, "listing sockets failed");
                    continue;
                }
            };
            for s in socks {
                let Some(ts) = by_cookie.get(&s.id.cookie()) else {
                    continue;
                };
                let peer = sock_peer(&s);
                for t in ts {
                    if t.protocol == protocol && t.backend == peer && t.port_be == s.id.dport_be {
                        match sockdiag::destroy(&s) {
                            Ok(()) => done.push(**t),
                            Err(e) => debug!(error = %e, "socket destroy"),
                        }
                    }
                }
            }
        }
    }
    done
}

/// The namespaces socket-LB sockets may live in, one path per namespace: those of the
/// processes in `cgroup` and below, and those named in /run/netns (where CNI plugins and
/// `ip netns` keep pod namespaces; a socket can outlive every process of its
/// namespace's owner but not the namespace's bind mount).
fn socket_netns(cgroup: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            if let Ok(md) = std::fs::metadata(e.path())
                && seen.insert((md.dev(), md.ino()))
            {
                out.push(e.path());
            }
        }
    }
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            for pid in procs.lines() {
                let p = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(md) = std::fs::metadata(&p)
                    && seen.insert((md.dev(), md.ino()))
                {
                    out.push(p);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// Destroys the stale sockets in the agent's namespace and in every namespace of the
/// socket-LB cgroup's processes; removes their reverse entries.
pub fn sweep_sockets(pin_dir: &Path, cgroup: Option<&Path>) -> Result<Vec<StaleTarget>> {
    let mut rev: BpfHashMap<MapData, SockRevKey, SockRevValue> =
        open_pinned(pin_dir, names::SOCK_REV)?
            .try_into()
            .context("SOCK_REV map")?;
    let keys: Vec<SockRevKey> = rev.keys().filter_map(|k| k.ok()).collect();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let backends: BpfHashMap<MapData, u32, Backend> = open_pinned(pin_dir, names::BACKENDS)?
        .try_into()
        .context("BACKENDS map")?;
    let live: Vec<Backend> = backends
        .iter()
        .filter_map(|r| r.ok())
        .map(|(_, b)| b)
        .collect();
    let targets = stale_targets(keys.iter().copied(), live);
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let mut done = destroy_in_current_netns(&targets);
    let own = std::fs::metadata("/proc/thread-self/ns/net").ok();
    for ns in cgroup.map(socket_netns).unwrap_or_default() {
        use std::os::unix::fs::MetadataExt;
        if let (Some(o), Ok(m)) = (&own, std::fs::metadata(&ns))
            && (o.dev(), o.ino()) == (m.dev(), m.ino())
        {
            continue;
        }
        let t = targets.clone();
        let r = std::thread::spawn(move || -> Result<Vec<StaleTarget>> {
            let f = File::open(&ns).with_context(|| format!("opening {}", ns.display()))?;
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!(
                    "setns {}: {}",
                    ns.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(destroy_in_current_netns(&t))
        })
        .join();
        match r {
            Ok(Ok(d)) => done.extend(d),
            Ok(Err(e)) => debug!(error = %e, "namespace gone before its sockets were swept"),
            Err(_) => warn!("socket sweep thread panicked"),
        }
    }
    for t in &done {
        let _ = rev.remove(&SockRevKey {
            cookie: t.cookie,
            backend: t.backend,
            port_be: t.port_be,
            pad: [0; 6],
        });
    }
    Ok(done)
}

/// Totals of the housekeeping thread (read by logs and metrics).
#[derive(Debug, Default)]
pub struct GcCounters {
    pub ct_sweeps: AtomicU64,
    pub ct_deleted: AtomicU64,
    pub sockets_destroyed: AtomicU64,
    pub errors: AtomicU64,
}

/// Settings of the housekeeping thread.
#[derive(Clone, Debug)]
pub struct GcConfig {
    pub pin_dir: PathBuf,
    /// Socket-LB cgroup (None: socket LB off, no socket sweep).
    pub cgroup: Option<PathBuf>,
    /// Conntrack sweep interval.
    pub ct_interval: Duration,
    /// Shortest time between two socket sweeps when syncs keep asking for them.
    pub socket_min_interval: Duration,
}

/// The housekeeping thread; it stops when the sender of `kick` is dropped. Every sync
/// that wrote `BACKENDS` kicks it so stale sockets are destroyed at once; conntrack is
/// swept every `ct_interval`.
pub fn spawn(
    cfg: GcConfig,
    kick: mpsc::Receiver<()>,
    counters: Arc<GcCounters>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("weir-gc".into())
        .spawn(move || {
            let mut next_ct = Instant::now() + cfg.ct_interval;
            let mut last_sock = Instant::now() - cfg.socket_min_interval;
            let mut sock_pending = cfg.cgroup.is_some();
            loop {
                let wait = if sock_pending {
                    (last_sock + cfg.socket_min_interval)
                        .saturating_duration_since(Instant::now())
                        .min(next_ct.saturating_duration_since(Instant::now()))
                } else {
                    next_ct.saturating_duration_since(Instant::now())
                };
                match kick.recv_timeout(wait) {
                    Ok(()) => sock_pending = cfg.cgroup.is_some(),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                if sock_pending && last_sock.elapsed() >= cfg.socket_min_interval {
                    sock_pending = false;
                    last_sock = Instant::now();
                    match sweep_sockets(&cfg.pin_dir, cfg.cgroup.as_deref()) {
                        Ok(d) if !d.is_empty() => {
                            counters
                                .sockets_destroyed
                                .fetch_add(d.len() as u64, Ordering::Relaxed);
                            info!(
                                destroyed = d.len(),
                                "destroyed sockets connected to removed backends"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %format!("{e:#}"), "socket sweep failed");
                        }
                    }
                }
                if Instant::now() >= next_ct {
                    let started = Instant::now();
                    let ct: Result<BpfHashMap<MapData, CtKey, CtEntry>> =
                        open_pinned(&cfg.pin_dir, names::CT)
                            .and_then(|m| m.try_into().context("CT map"));
                    match ct {
                        Ok(mut ct) => {
                            let s = sweep_conntrack(&mut ct, monotonic_ns());
                            counters.ct_sweeps.fetch_add(1, Ordering::Relaxed);
                            counters.ct_deleted.fetch_add(s.deleted, Ordering::Relaxed);
                            debug!(scanned = s.scanned, deleted = s.deleted, "conntrack sweep");
                            next_ct = Instant::now()
                                + crate::observe::scan_pause(cfg.ct_interval, started.elapsed());
                        }
                        Err(e) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %format!("{e:#}"), "conntrack sweep failed");
                            next_ct = Instant::now() + cfg.ct_interval;
                        }
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn a(s: &str) -> Addr {
        Addr::from_ipv4(s.parse::<Ipv4Addr>().unwrap())
    }

    fn be(addr: &str, port: u16, protocol: u8, serving: bool) -> Backend {
        Backend {
            addr: a(addr),
            port_be: port.to_be(),
            proto: protocol,
            flags: if serving { BE_F_SERVING } else { 0 },
            pad: 0,
        }
    }

    fn rev(cookie: u64, addr: &str, port: u16) -> SockRevKey {
        SockRevKey {
            cookie,
            backend: a(addr),
            port_be: port.to_be(),
            pad: [0; 6],
        }
    }

    #[test]
    fn udp_moves_when_not_serving_tcp_only_when_removed() {
        let t = stale_targets(
            [
                rev(1, "10.0.0.1", 53),
                rev(2, "10.0.0.2", 53),
                rev(3, "10.0.0.3", 53),
            ],
            [
                be("10.0.0.1", 53, proto::UDP, true),
                be("10.0.0.1", 53, proto::TCP, true),
                // Terminating, not serving.
                be("10.0.0.2", 53, proto::UDP, false),
                be("10.0.0.2", 53, proto::TCP, false),
            ],
        );
        let got: Vec<(u64, u8)> = t.iter().map(|t| (t.cookie, t.protocol)).collect();
        assert_eq!(
            got,
            vec![(2, proto::UDP), (3, proto::TCP), (3, proto::UDP)],
            "live: nothing; terminating: UDP only; removed: both"
        );
    }

    #[test]
    fn a_serving_duplicate_keeps_the_backend_live() {
        // The same address:port backs two Services, one of which sees it terminating.
        let t = stale_targets(
            [rev(7, "10.0.0.1", 53)],
            [
                be("10.0.0.1", 53, proto::UDP, false),
                be("10.0.0.1", 53, proto::UDP, true),
                be("10.0.0.1", 53, proto::TCP, true),
            ],
        );
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn expiry_follows_the_per_protocol_timeouts() {
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        let key = |proto_: u8, port: u16| CtKey {
            proto: proto_,
            sport_be: port,
            ..Default::default()
        };
        let entry = |idle_s: u64| CtEntry {
            created_ns: now - idle_s * s - s,
            last_seen_ns: now - idle_s * s,
            ..Default::default()
        };
        let got = expired(
            [
                (key(proto::UDP, 1), entry(30)),
                (key(proto::UDP, 2), entry(61)),
                (key(proto::ICMP, 3), entry(61)),
            ],
            now,
        );
        assert_eq!(got, vec![key(proto::UDP, 2), key(proto::ICMP, 3)]);
    }
}
