//! Flow and drop events: the agent reads the `EVENTS` ring buffer (it is the only
//! consumer), counts each event, optionally logs it as a structured line, keeps the last
//! few hundred, and fans them out to `weir flows` clients through `/flows` on its API
//! socket (and metrics address).
//!
//! ```text
//!  TC programs ─ token bucket ─> EVENTS ring ─> reader task ─┬─> counters (weir_flow_events_received_total)
//!                                                            ├─> log line (--flow-log)
//!                                                            ├─> recent events (last 512)
//!                                                            └─> broadcast ─> GET /flows?follow=1 ─> `weir flows -f`
//! ```
//!
//! `/flows` answers NDJSON, one [`FlowRecord`] per line: the recent events, then (with
//! `follow=1`) new ones as they come. Filters: `address=IP` (source, destination or
//! translated-to), `drops=1` (drops and rejects only).

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use bytes::Bytes;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tracing::{debug, info};
use weir_common::{
    Addr,
    events::{EV_DROP, EV_NEW, EV_REJECT, FlowEvent, HOOK_FROM_POD, HOOK_TO_POD, HOOK_UPLINK_OUT},
    metrics::DIR_EGRESS,
};

use crate::{
    http::{self, Body},
    metrics::{Shared, reason_name},
};

/// One event as the agent reports it (the JSON `weir flows -o json` prints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Wall-clock time, RFC 3339 UTC.
    pub time: String,
    /// "drop", "reject" or "new".
    pub kind: String,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// New connections: the backend chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translated_to: Option<String>,
    /// "ingress" or "egress".
    pub direction: String,
    /// The reason code's name (metrics label values: policy_denied, no_backend_reject, ...).
    pub reason: String,
    /// NetworkPolicy rule id that decided, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    /// The Service the packet was addressed to ("namespace/name:port/protocol").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Where it was seen: "from-pod", "to-pod" or "uplink", and the interface.
    pub hook: String,
    pub interface: String,
    /// Packet length.
    pub bytes: u32,
}

fn proto_name(p: u8) -> String {
    match p {
        weir_common::proto::TCP => "TCP".into(),
        weir_common::proto::UDP => "UDP".into(),
        weir_common::proto::SCTP => "SCTP".into(),
        weir_common::proto::ICMP => "ICMP".into(),
        weir_common::proto::ICMPV6 => "ICMPv6".into(),
        n => format!("proto-{n}"),
    }
}

fn sock(a: &Addr, port_be: u16, has_ports: bool) -> String {
    let ip = a.to_ip();
    match (ip, has_ports) {
        (IpAddr::V6(v6), true) => format!("[{v6}]:{}", u16::from_be(port_be)),
        (ip, true) => format!("{ip}:{}", u16::from_be(port_be)),
        (ip, false) => ip.to_string(),
    }
}

/// Monotonic `bpf_ktime_get_ns()` -> wall clock, from the offset between the clocks now.
pub fn wall_time(ts_ns: u64) -> SystemTime {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    let mono_now = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
    let age = Duration::from_nanos(mono_now.saturating_sub(ts_ns));
    SystemTime::now() - age
}

impl FlowRecord {
    /// Decodes an event; `service` names its Service port (from the agent's labels).
    pub fn from_event(e: &FlowEvent, time: SystemTime, service: Option<String>) -> FlowRecord {
        let ports = matches!(
            e.proto,
            weir_common::proto::TCP | weir_common::proto::UDP | weir_common::proto::SCTP
        );
        FlowRecord {
            time: crate::health::go_time(Some(time)),
            kind: match e.kind {
                EV_DROP => "drop",
                EV_REJECT => "reject",
                EV_NEW => "new",
                _ => "unknown",
            }
            .into(),
            protocol: proto_name(e.proto),
            source: sock(&e.src, e.sport_be, ports),
            destination: sock(&e.dst, e.dport_be, ports),
            translated_to: (e.kind == EV_NEW).then(|| sock(&e.nat_dst, e.nat_dport_be, ports)),
            direction: if e.direction == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            }
            .into(),
            reason: reason_name(e.reason),
            rule: (e.rule_id != 0).then_some(e.rule_id),
            service,
            hook: match e.hook {
                HOOK_FROM_POD => "from-pod",
                HOOK_TO_POD => "to-pod",
                HOOK_UPLINK_OUT => "uplink-out",
                _ => "uplink",
            }
            .into(),
            interface: crate::datapath::ifname_of(e.ifindex)
                .unwrap_or_else(|| format!("if{}", e.ifindex)),
            bytes: e.len,
        }
    }

    /// Whether the record involves `ip` (source, destination or backend).
    pub fn involves(&self, ip: &IpAddr) -> bool {
        let host = |s: &str| -> Option<IpAddr> {
            s.parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .ok()
                .or_else(|| s.parse().ok())
        };
        [
            Some(&self.source),
            Some(&self.destination),
            self.translated_to.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|s| host(s).as_ref() == Some(ip))
    }

    /// One line of `weir flows` text output.
    pub fn line(&self) -> String {
        let time = self.time.get(11..23).unwrap_or(&self.time);
        let what = match self.kind.as_str() {
            "new" => format!(
                "{} -> {} => {}",
                self.source,
                self.destination,
                self.translated_to.as_deref().unwrap_or("?")
            ),
            _ => format!("{} -> {}", self.source, self.destination),
        };
        let mut tail = String::new();
        if let Some(s) = &self.service {
            tail.push_str(&format!("  ({s})"));
        }
        if let Some(r) = self.rule {
            tail.push_str(&format!("  rule {r}"));
        }
        let reason = if self.kind == "new" {
            String::new()
        } else {
            format!("  {}", self.reason.replace('_', "-"))
        };
        format!(
            "{time}  {:<6} {:<4} {what}  {} {}{reason}{tail}",
            self.kind.to_uppercase(),
            self.protocol,
            self.direction,
            self.interface,
        )
    }
}

/// Fans events out to `/flows` clients and keeps the last few.
pub struct FlowHub {
    pub tx: broadcast::Sender<Arc<FlowRecord>>,
    recent: Mutex<VecDeque<Arc<FlowRecord>>>,
    pub keep: usize,
}

impl Default for FlowHub {
    fn default() -> Self {
        FlowHub {
            tx: broadcast::channel(4096).0,
            recent: Mutex::new(VecDeque::new()),
            keep: 512,
        }
    }
}

impl FlowHub {
    pub fn publish(&self, r: FlowRecord) {
        let r = Arc::new(r);
        {
            let mut q = self.recent.lock().expect("lock");
            if q.len() == self.keep {
                q.pop_front();
            }
            q.push_back(r.clone());
        }
        let _ = self.tx.send(r);
    }

    pub fn recent(&self) -> Vec<Arc<FlowRecord>> {
        self.recent.lock().expect("lock").iter().cloned().collect()
    }
}

/// `/flows` filters.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    pub address: Option<IpAddr>,
    pub drops: bool,
}

impl FlowFilter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        (!self.drops || r.kind != "new") && self.address.is_none_or(|a| r.involves(&a))
    }
}

/// The `/flows` response: recent matching events, then, with `follow`, new ones.
pub fn flows_response(
    hub: &Arc<FlowHub>,
    filter: FlowFilter,
    follow: bool,
) -> hyper::Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut sub = hub.tx.subscribe();
    let recent = hub.recent();
    tokio::spawn(async move {
        for r in recent.iter().filter(|r| filter.matches(r)) {
            let mut l = serde_json::to_string(&**r).expect("json");
            l.push('\n');
            if tx.send(Bytes::from(l)).await.is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        loop {
            match sub.recv().await {
                Ok(r) => {
                    if !filter.matches(&r) {
                        continue;
                    }
                    let mut l = serde_json::to_string(&*r).expect("json");
                    l.push('\n');
                    if tx.send(Bytes::from(l)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(n, "a flows client fell behind; events skipped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    http::stream("application/x-ndjson", rx)
}

/// Options of the event reader.
#[derive(Clone, Debug, Default)]
pub struct FlowLog {
    /// Log every event as a structured line (target `weir::flow`).
    pub log: bool,
}

/// Reads the ring until the task is aborted: counts, logs, publishes.
pub async fn read_events(
    ring: RingBuf<MapData>,
    hub: Arc<FlowHub>,
    shared: Arc<Shared>,
    opts: FlowLog,
) -> Result<()> {
    // SAFETY: the ring buffer owns its map fd for its whole life and always returns it.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("polling the EVENTS ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: FlowEvent is plain old data (integers only); the ring hands out
                // 8-byte aligned records, read unaligned anyway.
                let e: FlowEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) };
                batch.push(e);
            }
        }
        guard.clear_ready();
        if batch.is_empty() {
            continue;
        }
        {
            let mut c = shared.events.received.lock().expect("lock");
            for e in &batch {
                *c.entry(e.kind).or_default() += 1;
            }
        }
        let labels = shared.services.lock().expect("lock").by_id.clone();
        for e in batch {
            let service = labels
                .get(&e.svc_port_id)
                .map(|l| format!("{}/{}:{}/{}", l.namespace, l.name, l.port, l.protocol));
            let r = FlowRecord::from_event(&e, wall_time(e.ts_ns), service);
            if opts.log {
                info!(
                    target: "weir::flow",
                    kind = r.kind,
                    protocol = r.protocol,
                    source = r.source,
                    destination = r.destination,
                    translated_to = r.translated_to.as_deref().unwrap_or(""),
                    direction = r.direction,
                    reason = r.reason,
                    rule = r.rule.unwrap_or(0),
                    service = r.service.as_deref().unwrap_or(""),
                    interface = r.interface,
                    "flow event"
                );
            }
            hub.publish(r);
        }
    }
}

/// Serves `/flows` from a handler: parses the query.
pub fn handle(
    hub: &Arc<FlowHub>,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let mut f = FlowFilter::default();
    let mut follow = false;
    for (k, v) in http::query(req) {
        match k.as_str() {
            "follow" => follow = v != "0",
            "drops" => f.drops = v != "0",
            "address" => match v.parse() {
                Ok(a) => f.address = Some(a),
                Err(_) => {
                    return http::response(
                        StatusCode::BAD_REQUEST,
                        "text/plain; charset=utf-8",
                        format!("address={v} is not an IP address\n"),
                    );
                }
            },
            _ => {}
        }
    }
    flows_response(hub, f, follow)
}
