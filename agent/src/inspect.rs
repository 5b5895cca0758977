//! The inspection commands: `weir services`, `weir endpoints`, `weir conntrack`,
//! `weir explain`, `weir policy` and `weir flows` (through the agent: it reads the event
//! ring), reading the live pinned maps of a running node (`--pin-dir DIR` or `--node NAME`). Output is a
//! human-readable table by default and JSON with `-o json` (shapes in docs/cli.md).
//!
//! The views are computed from a [`MapImage`] (and conntrack entries) by pure functions,
//! so they are golden-tested without a kernel (`agent/testdata/cli/`); the commands only
//! add reading the pinned maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use weir_common::{
    Addr,
    config::NodeConfig,
    ct::*,
    lb::*,
    metrics::{Counter, REASON_POLICY_ISOLATED},
    policy::*,
    proto,
};
use weir_core::{
    datapath::Datapath as _,
    image::MapImage,
    model::{Cluster, ObjRef, Pod},
    policy::{
        Direction,
        compile::{PeerDef, RuleRef},
        dump::show_l4,
        eval::policies_for,
        image::show_addr_prefix,
        lookup::{Outcome, decide},
    },
};

use crate::datapath::{AyaDatapath, DEFAULT_BPFFS_ROOT, maps::open_pinned};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Text,
    /// JSON, for scripts.
    Json,
}

/// Which node's maps to read.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// The agent's pin directory (its `--pin-dir`).
    #[arg(long, conflicts_with = "node")]
    pub pin_dir: Option<PathBuf>,
    /// The node name (pins under /sys/fs/bpf/weir/<node>). Without --pin-dir or --node,
    /// the only instance under /sys/fs/bpf/weir is used.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Clone, Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub target: Target,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

impl Target {
    pub fn pin_dir(&self) -> Result<PathBuf> {
        if let Some(p) = &self.pin_dir {
            return Ok(p.clone());
        }
        if let Some(n) = &self.node {
            return Ok(PathBuf::from(DEFAULT_BPFFS_ROOT).join(n));
        }
        let instances: Vec<PathBuf> = std::fs::read_dir(DEFAULT_BPFFS_ROOT)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("maps").is_dir())
                    .collect()
            })
            .unwrap_or_default();
        match instances.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!("no weir instance under {DEFAULT_BPFFS_ROOT}; give --pin-dir or --node"),
            many => bail!(
                "several weir instances under {DEFAULT_BPFFS_ROOT} ({}); give --pin-dir or --node",
                many.iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

fn read_image(pin_dir: &Path) -> Result<MapImage> {
    AyaDatapath::open(pin_dir)?
        .read_image()
        .map_err(|e| anyhow::anyhow!("reading the maps under {}: {e}", pin_dir.display()))
}

fn print<T: Serialize>(output: Output, view: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    match output {
        Output::Text => print!("{}", text(view)),
        Output::Json => println!("{}", serde_json::to_string_pretty(view)?),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Formatting helpers

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        0 => "any".into(),
        n => format!("proto-{n}"),
    }
}

/// `ip:port`, `[ip6]:port`; the family wildcards print as 0.0.0.0 / [::].
fn sock(a: &Addr, port_be: u16) -> String {
    let port = u16::from_be(port_be);
    match a.to_ip() {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Renders rows as aligned columns (the last column is not padded).
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == n {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<width$}  ", width = w[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
    out
}

// ---------------------------------------------------------------------------------------
// weir services

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SlotView {
    pub slot: u16,
    pub backend_id: u32,
    /// `ip:port`; empty when the slot names a backend id that does not exist.
    pub backend: String,
    pub local: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FrontendView {
    /// `address:port/PROTOCOL` (NodePorts on the family wildcard 0.0.0.0 or [::]).
    pub frontend: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// ClusterIP, NodePort, LoadBalancer or ExternalIP.
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub rev_nat_id: u32,
    /// traffic-policy-local, session-affinity, maglev, masquerade, source-ranges,
    /// has-endpoints.
    pub flags: Vec<&'static str>,
    pub affinity_timeout_s: Option<u32>,
    /// The cluster-wide set (upstream clusterEndpoints), by slot.
    pub backends: Vec<SlotView>,
    /// The node-local set (upstream localEndpoints), by slot.
    pub local_backends: Vec<SlotView>,
    /// loadBalancerSourceRanges.
    pub source_ranges: Vec<String>,
    /// What happens to a new connection when the set it uses is empty: "reject" (no
    /// endpoints anywhere) or "drop" (endpoints exist, none usable here).
    pub when_empty: &'static str,
}

fn frontend_type(flags: u32) -> &'static str {
    if flags & SVC_F_NODEPORT != 0 {
        "NodePort"
    } else if flags & SVC_F_LOADBALANCER != 0 {
        "LoadBalancer"
    } else if flags & SVC_F_EXTERNAL != 0 {
        "ExternalIP"
    } else {
        "ClusterIP"
    }
}

fn flag_names(flags: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (f, n) in [
        (SVC_F_LOCAL, "traffic-policy-local"),
        (SVC_F_AFFINITY, "session-affinity"),
        (SVC_F_MAGLEV, "maglev"),
        (SVC_F_MASQ, "masquerade"),
        (SVC_F_SRC_RANGES, "source-ranges"),
        (SVC_F_HAS_ENDPOINTS, "has-endpoints"),
    ] {
        if flags & f != 0 {
            v.push(n);
        }
    }
    v
}

fn slots(img: &MapImage, k: &ServiceKey, scope: u8, n: u16) -> Vec<SlotView> {
    (1..=n)
        .map(|slot| {
            let sk = ServiceKey { scope, slot, ..*k };
            let id = img.services.get(&sk).map(|v| v.backend_id).unwrap_or(0);
            let be = img.backends.get(&id);
            SlotView {
                slot,
                backend_id: id,
                backend: be.map(|b| sock(&b.addr, b.port_be)).unwrap_or_default(),
                local: be.is_some_and(|b| b.flags & BE_F_LOCAL != 0),
            }
        })
        .collect()
}

fn lpm_to_cidr(plen: u32, k: &SourceRangeKey) -> String {
    // Prefix length counts the 32-bit rev-NAT id; v4 ranges start at bit 96 of the
    // v4-mapped address (see common::lb::SourceRangeKey).
    let bits = plen.saturating_sub(32);
    match k.addr.to_ip() {
        IpAddr::V4(v4) => format!("{v4}/{}", bits.saturating_sub(96)),
        IpAddr::V6(v6) => format!("{v6}/{bits}"),
    }
}

/// Every frontend of the image, in map key order.
pub fn services_view(img: &MapImage) -> Vec<FrontendView> {
    let mut ranges: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (plen, k) in img.source_ranges.keys() {
        ranges
            .entry(k.rev_nat_id)
            .or_default()
            .push(lpm_to_cidr(*plen, k));
    }
    img.services
        .iter()
        .filter(|(k, v)| k.slot == 0 && k.scope == SCOPE_CLUSTER && v.flags & SVC_F_VIP_MARKER == 0)
        .map(|(k, v)| FrontendView {
            frontend: format!("{}/{}", sock(&k.addr, k.port_be), proto_name(k.proto)),
            address: k.addr.to_string(),
            port: u16::from_be(k.port_be),
            protocol: proto_name(k.proto),
            type_: frontend_type(v.flags),
            rev_nat_id: v.rev_nat_id,
            flags: flag_names(v.flags),
            affinity_timeout_s: (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout_s),
            backends: slots(img, k, SCOPE_CLUSTER, v.count),
            local_backends: slots(img, k, SCOPE_LOCAL, v.local_count),
            source_ranges: ranges.get(&v.rev_nat_id).cloned().unwrap_or_default(),
            when_empty: if v.flags & SVC_F_HAS_ENDPOINTS != 0 {
                "drop"
            } else {
                "reject"
            },
        })
        .collect()
}

fn slot_line(s: &SlotView, scope: &str) -> String {
    let be = if s.backend.is_empty() {
        format!("backend {} MISSING", s.backend_id)
    } else {
        s.backend.clone()
    };
    format!(
        "{scope}{}) {be}{}",
        s.slot,
        if s.local { " (local)" } else { "" }
    )
}

pub fn services_text(v: &[FrontendView]) -> String {
    let mut rows = Vec::new();
    for f in v {
        let mut flags = f.flags.clone();
        flags.retain(|x| *x != "has-endpoints");
        let mut flags = flags.join(",");
        if let Some(t) = f.affinity_timeout_s {
            flags = flags.replace("session-affinity", &format!("session-affinity={t}s"));
        }
        if !f.source_ranges.is_empty() {
            flags = flags.replace(
                "source-ranges",
                &format!("source-ranges={}", f.source_ranges.join(";")),
            );
        }
        if flags.is_empty() {
            flags = "-".into();
        }
        let mut lines: Vec<String> = f.backends.iter().map(|s| slot_line(s, "")).collect();
        lines.extend(f.local_backends.iter().map(|s| slot_line(s, "local ")));
        if f.backends.is_empty() && f.local_backends.is_empty() {
            lines.push(format!("(no backends: {})", f.when_empty));
        }
        for (i, l) in lines.into_iter().enumerate() {
            rows.push(if i == 0 {
                vec![
                    f.frontend.clone(),
                    f.type_.to_string(),
                    f.rev_nat_id.to_string(),
                    flags.clone(),
                    l,
                ]
            } else {
                vec![
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    l,
                ]
            });
        }
    }
    table(&["FRONTEND", "TYPE", "ID", "FLAGS", "BACKENDS"], &rows)
}

pub fn services(a: &InspectArgs) -> Result<()> {
    let img = read_image(&a.target.pin_dir()?)?;
    print(a.output, &services_view(&img), |v| services_text(v))
}

// ---------------------------------------------------------------------------------------
// weir endpoints

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    /// `ip:port`.
    pub backend: String,
    pub protocol: String,
    /// local, terminating.
    pub flags: Vec<&'static str>,
    /// Frontends with a slot naming this backend (`address:port/PROTOCOL`, `local` set
    /// marked with a trailing `(local set)`).
    pub frontends: Vec<String>,
}

pub fn endpoints_view(img: &MapImage) -> Vec<BackendView> {
    let mut users: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (k, v) in img.services.iter().filter(|(k, _)| k.slot != 0) {
        let fe = format!("{}/{}", sock(&k.addr, k.port_be), proto_name(k.proto));
        let fe = if k.scope == SCOPE_LOCAL {
            format!("{fe} (local set)")
        } else {
            fe
        };
        users.entry(v.backend_id).or_default().insert(fe);
    }
    img.backends
        .iter()
        .map(|(id, b)| {
            let mut flags = Vec::new();
            if b.flags & BE_F_LOCAL != 0 {
                flags.push("local");
            }
            if b.flags & BE_F_TERMINATING != 0 {
                flags.push("terminating");
            }
            if b.flags & weir_common::lb::BE_F_SERVING == 0 {
                flags.push("not-serving");
            }
            BackendView {
                id: *id,
                backend: sock(&b.addr, b.port_be),
                protocol: proto_name(b.proto),
                flags,
                frontends: users
                    .get(id)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

pub fn endpoints_text(v: &[BackendView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.backend.clone(),
                b.protocol.clone(),
                if b.flags.is_empty() {
                    "-".into()
                } else {
                    b.flags.join(",")
                },
                if b.frontends.is_empty() {
                    "(unused)".into()
                } else {
                    b.frontends.join(", ")
                },
            ]
        })
        .collect();
    table(&["ID", "BACKEND", "PROTO", "FLAGS", "FRONTENDS"], &rows)
}

pub fn endpoints(a: &InspectArgs) -> Result<()> {
    let img = read_image(&a.target.pin_dir()?)?;
    print(a.output, &endpoints_view(&img), |v| endpoints_text(v))
}

// ---------------------------------------------------------------------------------------
// weir conntrack

#[derive(Clone, Debug, clap::Args)]
pub struct ConntrackArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// Only entries with this address as source or destination (before or after
    /// translation).
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// Only entries of this protocol (TCP, UDP, SCTP).
    #[arg(long)]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CtView {
    /// "service" (the backend a client connection to a frontend was given) or "flow"
    /// (a connection as on the wire; replies are rewritten by it).
    pub kind: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// service: `-> backend`; flow: what replies are rewritten to (if translated).
    pub translation: String,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// syn-sent, established, closing, reset (TCP); new, replied (others).
    pub state: &'static str,
    pub age_s: u64,
    pub idle_s: u64,
    pub expires_in_s: u64,
    pub packets: u64,
    pub bytes: u64,
}

fn ct_state(k: &CtKey, e: &CtEntry) -> &'static str {
    if k.proto == proto::TCP {
        if e.flags & CT_F_RST != 0 {
            "reset"
        } else if e.flags & (CT_F_FIN_FWD | CT_F_FIN_REV) != 0 {
            "closing"
        } else if e.flags & CT_F_SEEN_REPLY != 0 {
            "established"
        } else {
            "syn-sent"
        }
    } else if e.flags & CT_F_SEEN_REPLY != 0 {
        "replied"
    } else {
        "new"
    }
}

/// Conntrack entries as views, ages relative to `now_ns` (CLOCK_MONOTONIC, what
/// `bpf_ktime_get_ns` counts).
pub fn conntrack_view(entries: &BTreeMap<CtKey, CtEntry>, now_ns: u64) -> Vec<CtView> {
    let s = |ns: u64| ns / 1_000_000_000;
    entries
        .iter()
        .map(|(k, e)| {
            let translation = if k.kind == CT_KIND_SVC {
                let mut t = format!("-> {}", sock(&e.nat_dst, e.nat_dport_be));
                if e.flags & CT_F_SNAT != 0 {
                    let _ = write!(t, " from {}", sock(&e.nat_src, e.nat_sport_be));
                }
                t
            } else if e.flags & CT_F_DNAT != 0 {
                let mut t = format!("replies from {}", sock(&e.nat_dst, e.nat_dport_be));
                if e.flags & CT_F_SNAT != 0 {
                    let _ = write!(t, " to {}", sock(&e.nat_src, e.nat_sport_be));
                }
                t
            } else {
                String::new()
            };
            let idle = now_ns.saturating_sub(e.last_seen_ns);
            CtView {
                kind: if k.kind == CT_KIND_SVC {
                    "service"
                } else {
                    "flow"
                },
                protocol: proto_name(k.proto),
                source: sock(&k.src, k.sport_be),
                destination: sock(&k.dst, k.dport_be),
                translation,
                backend_id: e.backend_id,
                rev_nat_id: e.rev_nat_id,
                state: ct_state(k, e),
                age_s: s(now_ns.saturating_sub(e.created_ns)),
                idle_s: s(idle),
                expires_in_s: s(e.timeout_ns(k.proto).saturating_sub(idle)),
                packets: e.packets,
                bytes: e.bytes,
            }
        })
        .collect()
}

fn dur(s: u64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn conntrack_text(v: &[CtView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|c| {
            vec![
                c.protocol.clone(),
                c.kind.to_string(),
                c.source.clone(),
                c.destination.clone(),
                c.state.to_string(),
                dur(c.idle_s),
                dur(c.expires_in_s),
                c.packets.to_string(),
                c.bytes.to_string(),
                if c.translation.is_empty() {
                    "-".into()
                } else {
                    c.translation.clone()
                },
            ]
        })
        .collect();
    table(
        &[
            "PROTO",
            "KIND",
            "SOURCE",
            "DESTINATION",
            "STATE",
            "IDLE",
            "EXPIRES",
            "PACKETS",
            "BYTES",
            "TRANSLATION",
        ],
        &rows,
    )
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads every conntrack entry of a pinned CT map.
pub fn read_conntrack(pin_dir: &Path) -> Result<BTreeMap<CtKey, CtEntry>> {
    let m: aya::maps::HashMap<aya::maps::MapData, CtKey, CtEntry> =
        open_pinned(pin_dir, weir_common::maps::CT)?
            .try_into()
            .context("CT map")?;
    let mut out = BTreeMap::new();
    for r in m.iter() {
        let (k, v) = r?;
        out.insert(k, v);
    }
    Ok(out)
}

pub fn conntrack(a: &ConntrackArgs) -> Result<()> {
    let mut entries = read_conntrack(&a.inspect.target.pin_dir()?)?;
    if let Some(addr) = a.address {
        let x = Addr::from_ip(addr);
        entries.retain(|k, e| k.src == x || k.dst == x || e.nat_src == x || e.nat_dst == x);
    }
    if let Some(p) = &a.protocol {
        let p = p.to_ascii_uppercase();
        entries.retain(|k, _| proto_name(k.proto).eq_ignore_ascii_case(&p));
    }
    print(
        a.inspect.output,
        &conntrack_view(&entries, monotonic_ns()),
        |v| conntrack_text(v),
    )
}

// ---------------------------------------------------------------------------------------
// weir explain

#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// Source address of the packet.
    #[arg(long)]
    pub from: IpAddr,
    /// Destination address of the packet.
    #[arg(long)]
    pub to: IpAddr,
    /// Destination port.
    #[arg(long)]
    pub port: u16,
    /// Protocol: TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// The packet comes from a pod interface of this node (the datapath's from-pod hook),
    /// whatever its address. Without it, the source is a pod if it is in the cluster CIDR
    /// (--cluster-cidr of the agent).
    #[arg(long)]
    pub from_pod: bool,
}

/// One decision on the packet's path.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Step {
    /// frontend, source-ranges, backend-set, selection, masquerade, policy.
    pub stage: &'static str,
    pub decision: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub packet: String,
    pub steps: Vec<Step>,
    /// translated, rejected, dropped, forwarded (not a Service; routed unchanged).
    pub verdict: &'static str,
    /// The frontend the packet hits, if any.
    pub frontend: Option<FrontendView>,
    /// The backends a new connection may be given.
    pub candidates: Vec<String>,
}

fn in_cidr(cfg: &Option<NodeConfig>, a: &Addr) -> Option<String> {
    let c = cfg.as_ref()?;
    if !c.in_cluster_cidr(a) {
        return None;
    }
    Some(if a.is_v4() {
        format!("{}/{}", c.cluster_v4, c.cluster_v4_plen)
    } else {
        format!("{}/{}", c.cluster_v6, c.cluster_v6_plen)
    })
}

/// The path of a new connection `from` -> `to`:`port`/`protocol` through the maps in
/// `img`, decision by decision, as the datapath takes it (`dataplane-ebpf/src/flow.rs`
/// `service`/`choose`, `lb.rs`).
pub fn explain_view(
    img: &MapImage,
    from: IpAddr,
    to: IpAddr,
    port: u16,
    protocol: u8,
    from_pod: bool,
) -> Explanation {
    let mut steps = Vec::new();
    let packet = format!(
        "{from} -> {}/{}",
        sock(&Addr::from_ip(to), port.to_be()),
        proto_name(protocol)
    );
    let policy = Step {
        stage: "policy",
        decision: "not evaluated: the packet does not get that far".into(),
    };
    let dst = Addr::from_ip(to);
    let mut key = ServiceKey {
        addr: dst,
        port_be: port.to_be(),
        proto: protocol,
        scope: SCOPE_CLUSTER,
        slot: 0,
        pad: [0; 2],
    };
    let mut hit = img.services.get(&key).copied();
    let mut via = "an exact address, port and protocol match";
    if hit.is_none() && img.node_addrs.contains_key(&dst) {
        key.addr = if to.is_ipv4() {
            Addr::V4_ANY
        } else {
            Addr::V6_ANY
        };
        hit = img.services.get(&key).copied();
        via = "a NodePort: the destination is one of this node's addresses";
    }
    let Some(svc) = hit.filter(|v| v.flags & SVC_F_VIP_MARKER == 0) else {
        let marker = ServiceKey {
            addr: dst,
            port_be: 0,
            proto: 0,
            ..key
        };
        if img.services.contains_key(&marker) {
            steps.push(Step {
                stage: "frontend",
                decision: format!(
                    "{to} is a ClusterIP but has no {}/{} port: rejected (TCP RST / ICMP port unreachable), as kube-proxy does",
                    port,
                    proto_name(protocol)
                ),
            });
            steps.push(policy);
            return Explanation {
                packet,
                steps,
                verdict: "rejected",
                frontend: None,
                candidates: Vec::new(),
            };
        }
        steps.push(Step {
            stage: "frontend",
            decision: "no Service frontend matches: forwarded unchanged (routing decides)".into(),
        });
        let src = Addr::from_ip(from);
        let (step, all_denied) = policy_step(img, src, src, &[(dst, port)], protocol);
        steps.push(step);
        return Explanation {
            packet,
            steps,
            verdict: if all_denied { "dropped" } else { "forwarded" },
            frontend: None,
            candidates: Vec::new(),
        };
    };
    let fe = services_view(&MapImage {
        services: img
            .services
            .iter()
            .filter(|(k, _)| k.addr == key.addr && k.port_be == key.port_be && k.proto == key.proto)
            .map(|(k, v)| (*k, *v))
            .collect(),
        ..img.clone()
    })
    .into_iter()
    .next();
    let fe_name = format!("{}/{}", sock(&key.addr, key.port_be), proto_name(key.proto));
    steps.push(Step {
        stage: "frontend",
        decision: format!(
            "{fe_name} ({}, rev-NAT id {}) by {via}",
            frontend_type(svc.flags),
            svc.rev_nat_id
        ),
    });

    let src = Addr::from_ip(from);
    if svc.flags & SVC_F_SRC_RANGES != 0 {
        let ranges: Vec<String> = fe
            .as_ref()
            .map(|f| f.source_ranges.clone())
            .unwrap_or_default();
        let allowed = img.source_ranges.keys().any(|(plen, k)| {
            k.rev_nat_id == svc.rev_nat_id
                && weir_common::addr::in_prefix(&src, &k.addr, plen.saturating_sub(32))
        });
        if !allowed {
            steps.push(Step {
                stage: "source-ranges",
                decision: format!(
                    "{from} is outside loadBalancerSourceRanges {}: dropped",
                    ranges.join(", ")
                ),
            });
            steps.push(policy);
            return Explanation {
                packet,
                steps,
                verdict: "dropped",
                frontend: fe,
                candidates: Vec::new(),
            };
        }
        steps.push(Step {
            stage: "source-ranges",
            decision: format!(
                "{from} is inside loadBalancerSourceRanges {}",
                ranges.join(", ")
            ),
        });
    }

    let cidr = in_cidr(&img.config, &src);
    let src_is_pod = from_pod || cidr.is_some();
    let why_pod = if from_pod {
        "it comes from a pod interface (--from-pod)".to_string()
    } else if let Some(c) = &cidr {
        format!("it is in the cluster CIDR {c}")
    } else {
        "it is not in the cluster CIDR and not from a pod interface".to_string()
    };
    let external = svc.flags & SVC_F_EXTERNAL != 0;
    let policy_local = svc.flags & SVC_F_LOCAL != 0;
    let local = policy_local && !(external && src_is_pod);
    let (scope, n, set_name) = if local {
        (SCOPE_LOCAL, svc.local_count, "the node-local set")
    } else {
        (SCOPE_CLUSTER, svc.count, "the cluster-wide set")
    };
    let why_set = match (policy_local, external, local) {
        (false, false, _) => "internalTrafficPolicy is Cluster".to_string(),
        (false, true, _) => "externalTrafficPolicy is Cluster".to_string(),
        (true, false, _) => "internalTrafficPolicy is Local".to_string(),
        (true, true, true) => {
            format!("externalTrafficPolicy is Local and the source is not a pod: {why_pod}")
        }
        (true, true, false) => format!(
            "externalTrafficPolicy is Local, but traffic from pods short-circuits to the cluster-wide set; the source is a pod: {why_pod}"
        ),
    };
    let candidates: Vec<String> = slots(img, &key, scope, n)
        .into_iter()
        .map(|s| s.backend)
        .collect();
    steps.push(Step {
        stage: "backend-set",
        decision: format!(
            "{set_name}: {} backend{}{}; {why_set}",
            n,
            if n == 1 { "" } else { "s" },
            if candidates.is_empty() {
                String::new()
            } else {
                format!(" ({})", candidates.join(", "))
            }
        ),
    });
    if n == 0 {
        let (verdict, why) = if svc.flags & SVC_F_HAS_ENDPOINTS != 0 {
            (
                "dropped",
                "endpoints exist but none is usable here: dropped (kube-proxy drops under a Local policy)",
            )
        } else {
            (
                "rejected",
                "the Service has no endpoints: rejected (TCP RST / ICMP port unreachable)",
            )
        };
        steps.push(Step {
            stage: "selection",
            decision: why.into(),
        });
        steps.push(policy);
        return Explanation {
            packet,
            steps,
            verdict,
            frontend: fe,
            candidates,
        };
    }
    let mut sel = if svc.flags & SVC_F_MAGLEV != 0 {
        "Maglev: a hash of the 5-tuple picks the backend (so it depends on the source port)"
            .to_string()
    } else {
        "one backend at random per new connection".to_string()
    };
    if svc.flags & SVC_F_AFFINITY != 0 {
        sel = format!(
            "sessionAffinity ClientIP: {from} keeps the backend it was given while it connects at least every {}s; otherwise {sel}",
            svc.affinity_timeout_s
        );
    }
    steps.push(Step {
        stage: "selection",
        decision: format!("{sel}; conntrack keeps the choice for the connection"),
    });
    let masq_reason = if external && svc.flags & SVC_F_MASQ != 0 {
        Some("external traffic under externalTrafficPolicy Cluster".to_string())
    } else if !external && !src_is_pod {
        Some(format!(
            "ClusterIP traffic from outside the cluster: {why_pod}"
        ))
    } else {
        None
    };
    let masq_reason_set = masq_reason.is_some();
    let masq_addr = img
        .config
        .map(|c| if to.is_ipv4() { c.masq_v4 } else { c.masq_v6 })
        .filter(|a| *a != Addr::ZERO && *a != Addr::V4_ANY);
    steps.push(Step {
        stage: "masquerade",
        decision: match (masq_reason, masq_addr) {
            (Some(r), Some(a)) => format!("source rewritten to {a}; {r}"),
            (Some(r), None) => format!(
                "needs masquerading ({r}) but this node has no address of the family: dropped"
            ),
            (None, _)
                if candidates
                    .iter()
                    .any(|c| c.starts_with(&format!("{from}:"))) =>
            {
                format!("source kept, except for the backend {from} itself (hairpin: masqueraded)")
            }
            (None, _) => format!("source {from} kept"),
        },
    });
    // Policy sees the backend (after translation) and, at the backend's ingress, the
    // source as rewritten.
    let ingress_src = match (masq_reason_set, masq_addr) {
        (true, Some(a)) => a,
        _ => src,
    };
    let dests: Vec<(Addr, u16)> = slots(img, &key, scope, n)
        .iter()
        .filter_map(|s| img.backends.get(&s.backend_id))
        .map(|b| (b.addr, u16::from_be(b.port_be)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (step, all_denied) = policy_step(img, src, ingress_src, &dests, protocol);
    steps.push(step);
    Explanation {
        packet,
        steps,
        verdict: if all_denied { "dropped" } else { "translated" },
        frontend: fe,
        candidates,
    }
}

/// One direction's policy outcome in words.
fn outcome_text(img: &MapImage, o: Outcome, dir: Direction) -> String {
    let label = |id| rule_label(img, id).0;
    match o {
        Outcome::NoEndpoint => {
            "no policy state on this node (not a local pod, or no policy selects it): allowed here"
                .into()
        }
        Outcome::NotIsolated => "not isolated: allowed".into(),
        Outcome::SamePod => "the pod itself: allowed".into(),
        Outcome::LocalNode => "from this node: allowed".into(),
        Outcome::Allowed { rule_id } => format!("allowed by {}", label(rule_id)),
        Outcome::Denied { reason, rule_id } if reason == REASON_POLICY_ISOLATED => format!(
            "dropped: isolated with no {} rules (counted on {})",
            dir.name(),
            label(rule_id)
        ),
        Outcome::Denied { rule_id, .. } => {
            format!("dropped: no rule allows it (counted on {})", label(rule_id))
        }
    }
}

/// The policy step of a new connection from `src` to each of `dests` (after Service
/// translation; `ingress_src` is the source the destination sees), with the same lookups
/// as the datapath (`weir_core::policy::lookup`, the model the eBPF code follows): the
/// source's egress policy on this node and the destination's ingress policy, each when
/// the pod is on this node. Returns the step and whether every destination is denied.
fn policy_step(
    img: &MapImage,
    src: Addr,
    ingress_src: Addr,
    dests: &[(Addr, u16)],
    protocol: u8,
) -> (Step, bool) {
    let mut parts = Vec::new();
    let mut denied = 0;
    for (dst, port) in dests {
        let e = decide(&img.policy, Direction::Egress, src, *dst, protocol, *port);
        let i = decide(
            &img.policy,
            Direction::Ingress,
            ingress_src,
            *dst,
            protocol,
            *port,
        );
        if !e.allows() || !i.allows() {
            denied += 1;
        }
        let text = format!(
            "egress of {}: {}; ingress of {}: {}",
            src,
            outcome_text(img, e, Direction::Egress),
            dst,
            outcome_text(img, i, Direction::Ingress)
        );
        parts.push(if dests.len() > 1 {
            format!("to {}: {text}", sock(dst, port.to_be()))
        } else {
            text
        });
    }
    let all_denied = !dests.is_empty() && denied == dests.len();
    let mut decision = parts.join(" | ");
    if all_denied {
        decision.push_str(" => dropped by NetworkPolicy");
    } else if denied > 0 {
        let _ = write!(
            decision,
            " => {denied} of {} backends dropped by NetworkPolicy",
            dests.len()
        );
    }
    (
        Step {
            stage: "policy",
            decision,
        },
        all_denied,
    )
}

pub fn explain_text(e: &Explanation) -> String {
    let mut out = format!("packet {}\n", e.packet);
    for s in &e.steps {
        let _ = writeln!(out, "  {:<14} {}", format!("{}:", s.stage), s.decision);
    }
    let _ = writeln!(out, "  {:<14} {}", "verdict:", e.verdict);
    out
}

pub fn explain(a: &ExplainArgs) -> Result<()> {
    let p = match a.protocol.to_ascii_uppercase().as_str() {
        "TCP" => proto::TCP,
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        other => bail!("--protocol {other}: expected TCP, UDP or SCTP"),
    };
    let img = read_image(&a.inspect.target.pin_dir()?)?;
    print(
        a.inspect.output,
        &explain_view(&img, a.from, a.to, a.port, p, a.from_pod),
        explain_text,
    )
}

// ---------------------------------------------------------------------------------------
// weir policy

#[derive(Clone, Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// The pod: its IP address, or NAMESPACE/NAME with --source-dir.
    pub pod: String,
    /// A directory of the cluster's YAML (as the agent's directory source reads it), to
    /// name the pods behind addresses and resolve NAMESPACE/NAME. The verdicts always come
    /// from the live maps.
    #[arg(long)]
    pub source_dir: Option<PathBuf>,
}

/// Who a rule lets talk to the pod (ingress) or whom the pod may reach (egress).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PeerView {
    /// The remote identity, None for "any address".
    pub identity: Option<u32>,
    /// The addresses of that identity (IPCACHE), pods named when known.
    pub description: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PolicyRuleView {
    /// "allow" or "deny".
    pub verdict: &'static str,
    /// TCP, UDP, SCTP, or "any".
    pub protocol: String,
    /// "5432", "8000-8063" (several ranges comma-separated), or "any".
    pub ports: String,
    pub peers: PeerView,
    /// `namespace/policy#index` of the allow rule, or `namespace/policy default-deny`.
    pub rule: String,
    /// What the rule's peers are, in the policy's terms (with --source-dir).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_peers: Option<String>,
    /// Packets counted on the rule id (POLICY_COUNTERS; shared by the pods of the key).
    pub packets: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DirectionView {
    pub isolated: bool,
    /// The pod's policy key for this direction (0 when not isolated).
    pub policy_key: u32,
    /// The policies the maps name for this key (all policies selecting the pod with
    /// --source-dir).
    pub policies: Vec<String>,
    pub rules: Vec<PolicyRuleView>,
    /// What happens to everything no rule above matches.
    pub otherwise: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PolicyView {
    /// `namespace/name` when known.
    pub pod: Option<String>,
    pub ip: String,
    /// Whether the pod has an ENDPOINTS entry on this node (a pod of another node, or a
    /// pod no policy has been compiled for, has none and is not isolated here).
    pub endpoint: bool,
    pub ingress: DirectionView,
    pub egress: DirectionView,
}

/// Resolves the pod argument: an address, or NAMESPACE/NAME through the cluster.
pub fn resolve_pod(arg: &str, cluster: Option<&Cluster>) -> Result<(Option<String>, Vec<IpAddr>)> {
    if let Ok(ip) = arg.parse::<IpAddr>() {
        let name = cluster.and_then(|c| {
            c.pods
                .values()
                .find(|p| !p.host_network && p.ips.contains(&ip))
                .map(|p| p.id.to_string())
        });
        return Ok((name, vec![ip]));
    }
    let Some((ns, name)) = arg.split_once('/') else {
        bail!("{arg}: expected an IP address or NAMESPACE/NAME");
    };
    let Some(c) = cluster else {
        bail!("{arg}: naming a pod needs --source-dir (or give its IP address)");
    };
    let Some(p) = c.pods.get(&ObjRef::new(ns, name)) else {
        bail!("{arg}: no such pod in the source directory");
    };
    if p.ips.is_empty() {
        bail!("{arg}: the pod has no IP address");
    }
    Ok((Some(p.id.to_string()), p.ips.clone()))
}

fn pod_names(cluster: Option<&Cluster>) -> BTreeMap<IpAddr, String> {
    let mut m = BTreeMap::new();
    if let Some(c) = cluster {
        for p in c.pods.values().filter(|p| !p.host_network) {
            for ip in &p.ips {
                m.insert(*ip, p.id.to_string());
            }
        }
    }
    m
}

/// The addresses carrying `identity` in IPCACHE, pods named.
fn describe_identity(img: &MapImage, identity: u32, names: &BTreeMap<IpAddr, String>) -> String {
    const SHOWN: usize = 6;
    let members: Vec<String> = img
        .policy
        .ipcache
        .iter()
        .filter(|(_, v)| v.identity == identity)
        .map(|(k @ (plen, a), _)| {
            // Host entries are /128 over Addr for both families (IPv4 is v4-mapped).
            if *plen == 128 {
                let ip = a.to_ip();
                match names.get(&ip) {
                    Some(n) => format!("{n} ({ip})"),
                    None => ip.to_string(),
                }
            } else {
                format!("addresses in {}", show_addr_prefix(k))
            }
        })
        .collect();
    if members.is_empty() {
        return format!("identity {identity} (no address carries it)");
    }
    let mut s = members[..members.len().min(SHOWN)].join(", ");
    if members.len() > SHOWN {
        let _ = write!(s, " and {} more", members.len() - SHOWN);
    }
    s
}

/// The rule's peers in the policy's own terms.
fn rule_peers(cluster: Option<&Cluster>, r: &RuleRef) -> Option<String> {
    let c = cluster?;
    let p = c.policies.get(&r.policy)?;
    let idx = r.index? as usize;
    let rules = match r.direction {
        Direction::Ingress => &p.ingress,
        Direction::Egress => &p.egress,
    };
    let rule = rules.get(idx)?;
    Some(if rule.peers.is_empty() {
        "any peer".into()
    } else {
        rule.peers
            .iter()
            .map(|x| PeerDef::of(p, x).show())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

fn rule_label(img: &MapImage, id: u32) -> (String, Option<RuleRef>) {
    match img.policy.rules.get(&id) {
        Some(info) => {
            let r = RuleRef::from_info(info);
            let s = if info.kind == RULE_KIND_ALLOW {
                format!("{}#{}", info.name(), info.index)
            } else {
                format!("{} default-deny", info.name())
            };
            (s, r)
        }
        None => (format!("rule {id}"), None),
    }
}

fn direction_view(
    img: &MapImage,
    counters: &BTreeMap<u32, Counter>,
    cluster: Option<&Cluster>,
    pod: Option<&Pod>,
    ep: Option<&EndpointValue>,
    dir: Direction,
    names: &BTreeMap<IpAddr, String>,
) -> DirectionView {
    let (iso_flag, key) = match (dir, ep) {
        (_, None) => (0, 0),
        (Direction::Ingress, Some(e)) => (e.flags & EP_F_INGRESS_ISOLATED, e.ingress_key),
        (Direction::Egress, Some(e)) => (e.flags & EP_F_EGRESS_ISOLATED, e.egress_key),
    };
    let isolated = iso_flag != 0;
    let mut policies: BTreeSet<String> = BTreeSet::new();
    if let (Some(c), Some(p)) = (cluster, pod) {
        policies.extend(policies_for(c, p, dir).map(|np| np.id.to_string()));
    }
    if !isolated {
        return DirectionView {
            isolated,
            policy_key: 0,
            policies: policies.into_iter().collect(),
            rules: vec![],
            otherwise: if ep.is_none() {
                "not a pod with policy state on this node: not enforced here".into()
            } else {
                "not isolated: everything allowed".into()
            },
        };
    }
    let mut entries: Vec<(&(u32, PolicyKey), &PolicyValue)> = img
        .policy
        .policy
        .iter()
        .filter(|((_, k), _)| k.policy_key == key && k.direction == dir.abi())
        .collect();
    // Identity ANY last (it is the fallback lookup), then by protocol and port.
    entries.sort_by_key(|((plen, k), v)| {
        (
            k.identity == ID_ANY,
            k.identity,
            v.rule_id,
            k.proto,
            u16::from_be(k.port_be),
            *plen,
        )
    });
    // One line per (identity, rule, verdict, protocol): its port blocks joined.
    let mut rules: Vec<PolicyRuleView> = Vec::new();
    let mut otherwise = "dropped (no rule allows it)".to_string();
    for ((plen, k), v) in entries {
        let (label, rref) = rule_label(img, v.rule_id);
        if let Some(r) = &rref {
            policies.insert(r.policy.to_string());
        }
        if k.identity == ID_ANY && *plen == POLICY_PLEN_ANY_PROTO && v.verdict == VERDICT_DENY {
            otherwise = if v.reason == REASON_POLICY_ISOLATED {
                format!(
                    "dropped (isolated, no policy has {} rules; counted on {label}: {} packets)",
                    dir.name(),
                    counters.get(&v.rule_id).map_or(0, |c| c.packets)
                )
            } else {
                format!(
                    "dropped (no rule allows it; counted on {label}: {} packets)",
                    counters.get(&v.rule_id).map_or(0, |c| c.packets)
                )
            };
            continue;
        }
        let (protocol, port) = if *plen <= POLICY_PLEN_ANY_PROTO {
            ("any".to_string(), "any".to_string())
        } else {
            let l4 = show_l4(*plen, k);
            let (p, rest) = l4.split_once(' ').unwrap_or((&l4, ""));
            (
                p.to_string(),
                if rest == "any port" {
                    "any".into()
                } else {
                    rest.to_string()
                },
            )
        };
        let verdict = if v.verdict == VERDICT_ALLOW {
            "allow"
        } else {
            "deny"
        };
        let peers = PeerView {
            identity: (k.identity != ID_ANY).then_some(k.identity),
            description: if k.identity == ID_ANY {
                "any address".into()
            } else {
                describe_identity(img, k.identity, names)
            },
        };
        if let Some(last) = rules.last_mut()
            && last.rule == label
            && last.peers == peers
            && last.verdict == verdict
            && last.protocol == protocol
        {
            join_ports(&mut last.ports, &port);
            continue;
        }
        rules.push(PolicyRuleView {
            verdict,
            protocol,
            ports: port,
            peers,
            rule_peers: rref.as_ref().and_then(|r| rule_peers(cluster, r)),
            rule: label,
            packets: counters.get(&v.rule_id).map_or(0, |c| c.packets),
        });
    }
    DirectionView {
        isolated,
        policy_key: key,
        policies: policies.into_iter().collect(),
        rules,
        otherwise,
    }
}

/// Appends a port block to a comma-separated list, merged into the last range when the
/// two touch: the maps hold a port range as aligned power-of-two blocks (`8000-8999` is
/// 8000-8031, 8032-8063, ... 8992-8999), and the reader wrote 8000-8999.
fn join_ports(ports: &mut String, next: &str) {
    let range = |s: &str| -> Option<(u32, u32)> {
        match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|a| (a, a)),
        }
    };
    let cut = ports.rfind(',').map_or(0, |i| i + 1);
    if let (Some((lo, hi)), Some((nlo, nhi))) = (range(&ports[cut..]), range(next))
        && nlo == hi + 1
    {
        ports.truncate(cut);
        let _ = write!(ports, "{lo}-{nhi}");
        return;
    }
    let _ = write!(ports, ",{next}");
}

/// What the pod at `ip` may send and receive, from the policy maps in `img`
/// (`counters`: POLICY_COUNTERS; `cluster`: names for addresses, if known).
pub fn policy_view(
    img: &MapImage,
    counters: &BTreeMap<u32, Counter>,
    cluster: Option<&Cluster>,
    name: Option<String>,
    ip: IpAddr,
) -> PolicyView {
    let a = Addr::from_ip(ip);
    let ep = img.policy.endpoints.get(&a);
    let names = pod_names(cluster);
    let pod = cluster.and_then(|c| {
        c.pods
            .values()
            .find(|p| !p.host_network && p.ips.contains(&ip))
    });
    let view = |dir| direction_view(img, counters, cluster, pod, ep, dir, &names);
    PolicyView {
        pod: name.or_else(|| names.get(&ip).cloned()),
        ip: ip.to_string(),
        endpoint: ep.is_some(),
        ingress: view(Direction::Ingress),
        egress: view(Direction::Egress),
    }
}

pub fn policy_text(v: &PolicyView) -> String {
    let mut out = match &v.pod {
        Some(p) => format!("pod {p} ({})", v.ip),
        None => format!("pod {}", v.ip),
    };
    if !v.endpoint {
        out.push_str(": no ENDPOINTS entry on this node");
    }
    out.push('\n');
    for (dir, d, word) in [("ingress", &v.ingress, "from"), ("egress", &v.egress, "to")] {
        if !d.isolated {
            let _ = writeln!(out, "{dir}: {}", d.otherwise);
            if !d.policies.is_empty() {
                let _ = writeln!(out, "  (selected by {})", d.policies.join(", "));
            }
            continue;
        }
        let _ = writeln!(
            out,
            "{dir}: isolated by {} (policy key {})",
            if d.policies.is_empty() {
                "?".to_string()
            } else {
                d.policies.join(", ")
            },
            d.policy_key
        );
        if dir == "ingress" {
            let _ = writeln!(out, "  allow anything from this node's own addresses");
        }
        for r in &d.rules {
            let l4 = match (r.protocol.as_str(), r.ports.as_str()) {
                ("any", _) => "any protocol".to_string(),
                (p, "any") => format!("{p} any port"),
                (p, ports) => format!("{p} {ports}"),
            };
            let peers = match r.peers.identity {
                Some(id) => format!("identity {id}: {}", r.peers.description),
                None => r.peers.description.clone(),
            };
            let _ = writeln!(
                out,
                "  {} {l4} {word} {peers}   (rule {}{}; {} packets)",
                r.verdict,
                r.rule,
                r.rule_peers
                    .as_ref()
                    .map(|p| format!(": {p}"))
                    .unwrap_or_default(),
                r.packets
            );
        }
        let _ = writeln!(out, "  everything else: {}", d.otherwise);
    }
    out
}

pub fn policy(a: &PolicyArgs) -> Result<()> {
    let cluster = match &a.source_dir {
        Some(d) => {
            let (c, errs) = crate::source::dir::read_cluster(d)
                .with_context(|| format!("reading {}", d.display()))?;
            for e in errs {
                eprintln!("warning: {}", e.message);
            }
            Some(c)
        }
        None => None,
    };
    let (name, ips) = resolve_pod(&a.pod, cluster.as_ref())?;
    let pin = a.inspect.target.pin_dir()?;
    let img = read_image(&pin)?;
    let counters = AyaDatapath::open(&pin)?
        .policy_counters()
        .map_err(|e| anyhow::anyhow!("reading POLICY_COUNTERS under {}: {e}", pin.display()))?;
    let views: Vec<PolicyView> = ips
        .iter()
        .map(|ip| policy_view(&img, &counters, cluster.as_ref(), name.clone(), *ip))
        .collect();
    match a.inspect.output {
        Output::Text => {
            for v in &views {
                print!("{}", policy_text(v));
            }
        }
        // Always a list: a dual-stack pod named by NAMESPACE/NAME has one view per address.
        Output::Json => println!("{}", serde_json::to_string_pretty(&views)?),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// weir flows: designed in docs/cli.md, implemented with its issue.

#[derive(Clone, Debug, clap::Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// Only flows from or to this address (source, destination or backend).
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// Only drops and rejects.
    #[arg(long)]
    pub drops: bool,
    /// Keep following new events until interrupted (without it: the agent's recent
    /// events, then exit).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The agent's API socket (its --api-socket) [default: /run/weir/<pin-dir name>.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// `weir flows`: the agent's flow events (it is the ring buffer's only reader), through
/// its API socket, one line each.
pub fn flows(a: &FlowsArgs) -> Result<()> {
    use std::io::{BufRead as _, Write as _};
    let socket = match &a.socket {
        Some(s) => s.clone(),
        None => crate::observe::default_api_socket(&a.inspect.target.pin_dir()?),
    };
    let mut q = Vec::new();
    if a.follow {
        q.push("follow=1".to_string());
    }
    if a.drops {
        q.push("drops=1".into());
    }
    if let Some(ip) = a.address {
        q.push(format!("address={ip}"));
    }
    let path = format!("/flows?{}", q.join("&"));
    let (status, _, mut body) = crate::http::open(
        &crate::http::Endpoint::Unix(socket.clone()),
        &path,
        &[],
        None,
    )
    .with_context(|| {
        format!(
            "reaching the agent at {} (is it running? see --socket)",
            socket.display()
        )
    })?;
    if status != 200 {
        let mut msg = String::new();
        let _ = std::io::Read::read_to_string(&mut body, &mut msg);
        bail!("the agent answered {status}: {}", msg.trim());
    }
    let stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        if body.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut out = stdout.lock();
        let r = match a.inspect.output {
            Output::Json => out.write_all(line.as_bytes()),
            Output::Text => match serde_json::from_str::<crate::flows::FlowRecord>(&line) {
                Ok(r) => writeln!(out, "{}", r.line()),
                Err(_) => continue,
            },
        };
        if r.is_err() || out.flush().is_err() {
            // The reader went away (a closed pipe).
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_core::{
        datapath::{Datapath as _, FakeDatapath},
        pipeline::NodeSettings,
        sync::{SyncInput, Syncer},
    };

    use super::*;
    use crate::source::{Event, Kind, SourceEvent, store::Store, yaml};

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/cli")
            .join(name)
    }

    /// Compares `got` with the golden file, or rewrites it with UPDATE_GOLDEN=1.
    fn golden(name: &str, got: &str) {
        let p = testdata(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&p, got).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; create it with UPDATE_GOLDEN=1 cargo nextest run -p weir --lib inspect",
                p.display()
            )
        });
        assert!(
            got == want,
            "{} differs (regenerate with UPDATE_GOLDEN=1 if the change is intended):\n--- got\n{got}\n--- want\n{want}",
            p.display()
        );
    }

    /// The map image the agent programs on node-a for testdata/cli/cluster.yaml, read back
    /// from the fake datapath.
    fn image() -> MapImage {
        image_of("cluster.yaml").0
    }

    /// The map image the agent programs on node-a for a cluster file of testdata/cli, and
    /// the cluster snapshot.
    fn image_of(file: &str) -> (MapImage, Cluster) {
        let text = std::fs::read_to_string(testdata(file)).unwrap();
        let (objs, errs) = yaml::parse_documents(&text, file);
        assert!(errs.is_empty(), "{errs:?}");
        let mut store = Store::new();
        let src = store.register("golden", &Kind::ALL);
        for o in objs {
            store.apply(SourceEvent {
                source: src,
                event: Event::Apply(o),
            });
        }
        let mut dp = FakeDatapath::default();
        let mut s = Syncer::new(
            NodeSettings {
                node_name: "node-a".into(),
                cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                compile: weir_core::compile::CompileOptions {
                    maglev_table_size: 7,
                    ..Default::default()
                },
                ..Default::default()
            },
            MapImage::default(),
            dp.capacities(),
        );
        let changes = store.take_changes();
        let r = s.sync(
            SyncInput {
                cluster: store.cluster(),
                changes: &changes,
                sources_synced: true,
                generation: 1,
            },
            &mut dp,
        );
        assert!(r.errors.is_empty() && r.apply_error.is_none(), "{r:?}");
        (dp.read_image().unwrap(), store.cluster().clone())
    }

    /// `weir policy` for the pods of testdata/cli/policy.yaml on node-a: an ingress
    /// allow-list with a named port, an egress ipBlock with an except, a pod isolated for
    /// egress with no rules, a pod of another node, and a pod no policy selects.
    #[test]
    fn policy_golden() {
        let (img, c) = image_of("policy.yaml");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Counters as the datapath would have left them: one rule allowed 3 packets.
        let db = img.policy.endpoints[&Addr::from_ip(ip("10.244.1.10"))];
        let allow_id = img
            .policy
            .policy
            .iter()
            .find(|((_, k), v)| k.policy_key == db.ingress_key && v.verdict == VERDICT_ALLOW)
            .map(|(_, v)| v.rule_id)
            .unwrap();
        let counters = BTreeMap::from([(
            allow_id,
            Counter {
                packets: 3,
                bytes: 180,
            },
        )]);
        let mut views = Vec::new();
        for (arg, with_names) in [
            ("shop/db", true),
            ("shop/web", true),
            ("shop/batch", true),
            ("10.244.1.10", false),
            ("shop/client", true),
            ("shop/remote", true),
        ] {
            let cl = with_names.then_some(&c);
            let (name, ips) = resolve_pod(arg, cl).unwrap();
            views.push(policy_view(&img, &counters, cl, name, ips[0]));
        }
        golden(
            "policy.txt",
            &views.iter().map(policy_text).collect::<Vec<_>>().join("\n"),
        );
        golden(
            "policy.json",
            &(serde_json::to_string_pretty(&views).unwrap() + "\n"),
        );
        // `weir explain`'s policy step on the same maps: allowed, denied at the
        // destination's ingress, denied at the source's egress (isolated, no rules).
        let ex: Vec<Explanation> = [
            ("10.244.1.11", "10.244.1.10"),
            ("10.244.1.12", "10.244.1.10"),
            ("10.244.1.13", "10.244.1.10"),
        ]
        .iter()
        .map(|(f, t)| explain_view(&img, ip(f), ip(t), 5432, proto::TCP, true))
        .collect();
        golden(
            "explain-policy.txt",
            &ex.iter().map(explain_text).collect::<Vec<_>>().join("\n"),
        );
        let verdicts: Vec<&str> = ex.iter().map(|e| e.verdict).collect();
        assert_eq!(verdicts, ["forwarded", "dropped", "dropped"]);
        // The facts the text shows, independently of the golden file.
        assert!(views[0].ingress.isolated && !views[0].egress.isolated);
        assert_eq!(views[0].ingress.rules.len(), 1, "{:?}", views[0].ingress);
        assert_eq!(views[0].ingress.rules[0].verdict, "allow");
        assert_eq!(views[0].ingress.rules[0].ports, "5432");
        assert!(
            views[0].ingress.rules[0]
                .peers
                .description
                .contains("shop/client")
        );
        assert_eq!(views[0].ingress.rules[0].packets, 3);
        assert!(views[1].egress.isolated);
        assert!(views[2].egress.isolated && views[2].egress.rules.is_empty());
        assert!(views[2].egress.otherwise.contains("isolated"));
        assert_eq!(views[3].pod, None);
        assert!(!views[4].ingress.isolated && !views[4].egress.isolated);
        assert!(!views[5].endpoint);
        assert!(resolve_pod("shop/db", None).is_err());
        assert!(resolve_pod("shop/nope", Some(&c)).is_err());
    }

    #[test]
    fn services_golden() {
        let v = services_view(&image());
        golden("services.txt", &services_text(&v));
        golden(
            "services.json",
            &(serde_json::to_string_pretty(&v).unwrap() + "\n"),
        );
    }

    #[test]
    fn endpoints_golden() {
        let v = endpoints_view(&image());
        golden("endpoints.txt", &endpoints_text(&v));
        golden(
            "endpoints.json",
            &(serde_json::to_string_pretty(&v).unwrap() + "\n"),
        );
    }

    #[test]
    fn explain_golden() {
        let img = image();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases = [
            // A pod to the ClusterIP.
            ("10.244.1.5", "10.96.0.10", 80, proto::TCP, false),
            // A host outside the cluster CIDR to the ClusterIP: masqueraded.
            ("192.168.10.50", "10.96.0.10", 80, proto::TCP, false),
            // A port the ClusterIP does not have.
            ("10.244.1.5", "10.96.0.10", 8080, proto::TCP, false),
            // An external client to the NodePort under eTP=Local.
            ("203.0.113.9", "192.168.10.11", 30080, proto::TCP, false),
            // A pod to the same NodePort: short-circuited to the cluster-wide set.
            ("10.244.1.5", "192.168.10.11", 30080, proto::TCP, false),
            // The LoadBalancer IP from inside and outside its source ranges.
            ("203.0.113.9", "198.51.100.7", 443, proto::TCP, false),
            ("192.0.2.1", "198.51.100.7", 443, proto::TCP, false),
            // No endpoints; iTP=Local without local endpoints.
            ("10.244.1.5", "10.96.0.13", 53, proto::UDP, false),
            ("10.244.1.5", "10.96.0.14", 80, proto::TCP, true),
            // Not a Service.
            ("10.244.1.5", "10.244.2.7", 8080, proto::TCP, true),
        ];
        let views: Vec<Explanation> = cases
            .iter()
            .map(|(f, t, p, pr, fp)| explain_view(&img, ip(f), ip(t), *p, *pr, *fp))
            .collect();
        golden(
            "explain.txt",
            &views
                .iter()
                .map(explain_text)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        golden(
            "explain.json",
            &(serde_json::to_string_pretty(&views).unwrap() + "\n"),
        );
        let verdicts: Vec<&str> = views.iter().map(|v| v.verdict).collect();
        assert_eq!(
            verdicts,
            [
                "translated",
                "translated",
                "rejected",
                "translated",
                "translated",
                "translated",
                "dropped",
                "rejected",
                "dropped",
                "forwarded"
            ]
        );
    }

    #[test]
    fn touching_port_blocks_are_shown_as_one_range() {
        let mut p = "8000-8031".to_string();
        for b in [
            "8032-8063",
            "8064-8191",
            "8192-8999",
            "9100",
            "9101",
            "9200-9201",
        ] {
            join_ports(&mut p, b);
        }
        assert_eq!(p, "8000-8999,9100-9101,9200-9201");
        let mut p = "80".to_string();
        join_ports(&mut p, "443");
        assert_eq!(p, "80,443");
    }

    /// A conntrack key from host-order ports.
    fn ct_key(src: Addr, sport: u16, dst: Addr, dport: u16, proto: u8, kind: u8) -> CtKey {
        CtKey {
            src,
            dst,
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            proto,
            kind,
            pad: [0; 2],
        }
    }

    #[test]
    fn conntrack_golden() {
        let a = |s: &str| Addr::from_ip(s.parse().unwrap());
        let s = 1_000_000_000u64;
        let now = 10_000 * s;
        let mut m = BTreeMap::new();
        let client = a("10.244.1.5");
        m.insert(
            ct_key(client, 40000, a("10.96.0.10"), 80, proto::TCP, CT_KIND_SVC),
            CtEntry {
                created_ns: now - 90 * s,
                last_seen_ns: now - 2 * s,
                nat_src: client,
                nat_dst: a("10.244.2.7"),
                nat_sport_be: 40000u16.to_be(),
                nat_dport_be: 8080u16.to_be(),
                flags: CT_F_DNAT | CT_F_SEEN_REPLY | CT_F_SYN,
                backend_id: 2,
                rev_nat_id: 1,
                packets: 12,
                bytes: 3400,
                ..Default::default()
            },
        );
        m.insert(
            ct_key(
                client,
                40000,
                a("10.244.2.7"),
                8080,
                proto::TCP,
                CT_KIND_FLOW,
            ),
            CtEntry {
                created_ns: now - 90 * s,
                last_seen_ns: now - 2 * s,
                nat_src: client,
                nat_dst: a("10.96.0.10"),
                nat_sport_be: 40000u16.to_be(),
                nat_dport_be: 80u16.to_be(),
                flags: CT_F_DNAT | CT_F_SEEN_REPLY | CT_F_SYN,
                tcp_fwd: 0x18,
                tcp_rev: 0x12,
                backend_id: 2,
                rev_nat_id: 1,
                packets: 20,
                bytes: 9100,
            },
        );
        m.insert(
            ct_key(
                a("203.0.113.9"),
                5353,
                a("192.168.10.11"),
                30053,
                proto::UDP,
                CT_KIND_SVC,
            ),
            CtEntry {
                created_ns: now - 5 * s,
                last_seen_ns: now - 5 * s,
                nat_src: a("192.168.10.11"),
                nat_dst: a("10.244.2.8"),
                nat_sport_be: 61234u16.to_be(),
                nat_dport_be: 53u16.to_be(),
                flags: CT_F_DNAT | CT_F_SNAT,
                backend_id: 3,
                rev_nat_id: 4,
                packets: 1,
                bytes: 60,
                ..Default::default()
            },
        );
        let v = conntrack_view(&m, now);
        golden("conntrack.txt", &conntrack_text(&v));
        golden(
            "conntrack.json",
            &(serde_json::to_string_pretty(&v).unwrap() + "\n"),
        );
    }
}
