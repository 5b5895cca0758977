//! The collector: encodes every weir metric but the histograms from [`Shared`] at each
//! scrape. Names follow the Prometheus conventions (base units in the name, `_total`
//! on counters, which the encoder appends); docs/metrics.md lists them.

use std::{collections::BTreeMap, fmt::Error as FmtError, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};
use tracing::debug;
use weir_common::{
    ct::{CT_KIND_FLOW, CT_KIND_SVC},
    events::*,
    maps as names,
    metrics::{DIR_EGRESS, DIR_INGRESS, REASON_NAMES, index},
};

use super::{Shared, reason_name, verdict_of};

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct WeirCollector {
    pub shared: Arc<Shared>,
}

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(Labels, u64)],
) -> Result<(), FmtError> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    if let [(labels, v)] = series
        && labels.is_empty()
    {
        // A single series without labels: `name value`, not `name{} value`.
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges<V: prometheus_client::encoding::EncodeGaugeValue + Copy + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(Labels, V)],
) -> Result<(), FmtError>
where
    ConstGauge<V>: prometheus_client::encoding::EncodeMetric,
{
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    if let [(labels, v)] = series
        && labels.is_empty()
    {
        // A single series without labels: `name value`, not `name{} value`.
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn one(v: u64) -> Vec<(Labels, u64)> {
    vec![(vec![], v)]
}

fn dir_name(d: u8) -> &'static str {
    if d == DIR_EGRESS { "egress" } else { "ingress" }
}

fn ct_proto(p: u8) -> String {
    match p {
        weir_common::proto::TCP => "TCP".into(),
        weir_common::proto::UDP => "UDP".into(),
        weir_common::proto::SCTP => "SCTP".into(),
        weir_common::proto::ICMP => "ICMP".into(),
        weir_common::proto::ICMPV6 => "ICMPv6".into(),
        n => format!("{n}"),
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl Collector for WeirCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), FmtError> {
        let s = &self.shared;
        let snap = s.snapshot.lock().expect("lock").clone();

        // Build info.
        {
            let mut m = enc.encode_descriptor(
                "weir_build",
                "Build of the running agent: version and a digest of its embedded eBPF object",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&s.build)?;
        }

        // Datapath packets and bytes by reason and direction.
        let dp = match &s.kernel {
            Some(k) => k.datapath().unwrap_or_else(|e| {
                debug!("reading METRICS: {e:#}");
                BTreeMap::new()
            }),
            None => BTreeMap::new(),
        };
        let mut reasons: Vec<u8> = (0..REASON_NAMES.len() as u8).collect();
        for i in dp.keys() {
            let r = (i >> 1) as u8;
            if !reasons.contains(&r) {
                reasons.push(r);
            }
        }
        let mut pk = Vec::new();
        let mut by = Vec::new();
        for r in &reasons {
            for d in [DIR_INGRESS, DIR_EGRESS] {
                let c = dp.get(&index(*r, d)).copied().unwrap_or_default();
                let l: Labels = vec![
                    ("reason", reason_name(*r)),
                    ("direction", dir_name(d).into()),
                    ("verdict", verdict_of(*r).into()),
                ];
                pk.push((l.clone(), c.packets));
                by.push((l, c.bytes));
            }
        }
        counters(
            &mut enc,
            "weir_datapath_packets",
            "Packets the datapath handled, by reason (forwarded, translated, policy_denied, no_backend_reject, ...), direction (egress: from a pod, ingress: towards a pod or into the node) and verdict (forward, drop, reject)",
            None,
            &pk,
        )?;
        counters(
            &mut enc,
            "weir_datapath",
            "Bytes the datapath handled (packet lengths as the hook saw them, link-layer header included), by reason, direction and verdict",
            Some(&Unit::Bytes),
            &by,
        )?;

        // Per-Service-port counters, with the cardinality limit.
        let svc = match &s.kernel {
            Some(k) => k.services().unwrap_or_else(|e| {
                debug!("reading SVC_COUNTERS: {e:#}");
                BTreeMap::new()
            }),
            None => BTreeMap::new(),
        };
        let labels = s.services.lock().expect("lock").clone();
        let mut per: BTreeMap<(String, String, String, &'static str), SvcCounter> = BTreeMap::new();
        let mut other = SvcCounter::default();
        let mut others = 0u64;
        for id in &labels.members {
            if let Some(l) = labels.by_id.get(id) {
                per.entry((
                    l.namespace.clone(),
                    l.name.clone(),
                    l.port.to_string(),
                    l.protocol,
                ))
                .or_default();
            }
        }
        for (id, l) in &labels.by_id {
            if !labels.members.contains(id) {
                others += 1;
            }
            let _ = l;
        }
        for (id, c) in &svc {
            let Some(l) = labels.by_id.get(id) else {
                // Counters of an id the agent does not know (yet, or any more).
                continue;
            };
            let slot = if labels.members.contains(id) {
                per.entry((
                    l.namespace.clone(),
                    l.name.clone(),
                    l.port.to_string(),
                    l.protocol,
                ))
                .or_default()
            } else {
                &mut other
            };
            slot.packets += c.packets;
            slot.bytes += c.bytes;
            slot.new_conns += c.new_conns;
        }
        let mut series: Vec<(Labels, SvcCounter)> = per
            .into_iter()
            .map(|((ns, name, port, proto), c)| {
                (
                    vec![
                        ("namespace", ns),
                        ("name", name),
                        ("port", port),
                        ("protocol", proto.to_string()),
                    ],
                    c,
                )
            })
            .collect();
        if others > 0 {
            series.push((
                vec![
                    ("namespace", String::new()),
                    ("name", "other".into()),
                    ("port", String::new()),
                    ("protocol", String::new()),
                ],
                other,
            ));
        }
        let pick = |f: fn(&SvcCounter) -> u64| -> Vec<(Labels, u64)> {
            series.iter().map(|(l, c)| (l.clone(), f(c))).collect()
        };
        counters(
            &mut enc,
            "weir_service_packets",
            "Packets sent to a Service port and translated to one of its backends (client to Service direction), by namespace, name, port and protocol; Service ports beyond --metrics-service-limit are summed into the series name=\"other\"",
            None,
            &pick(|c| c.packets),
        )?;
        counters(
            &mut enc,
            "weir_service",
            "Bytes sent to a Service port and translated to a backend (client to Service direction)",
            Some(&Unit::Bytes),
            &pick(|c| c.bytes),
        )?;
        counters(
            &mut enc,
            "weir_service_new_connections",
            "New connections to a Service port (a backend was chosen: per-packet translation or socket-level connect)",
            None,
            &pick(|c| c.new_conns),
        )?;
        gauges(
            &mut enc,
            "weir_service_ports",
            "Service ports known; series=\"own\" have their own weir_service_* series, series=\"other\" are summed into name=\"other\"",
            None,
            &[
                (vec![("series", "own".into())], labels.members.len() as i64),
                (vec![("series", "other".into())], others as i64),
            ],
        )?;

        // Conntrack and map sizes.
        let ct = s.ct.lock().expect("lock").clone();
        let mut ctl = Vec::new();
        for ((p, k), n) in &ct.by_proto {
            let kind = match *k {
                CT_KIND_FLOW => "flow",
                CT_KIND_SVC => "service",
                _ => "other",
            };
            ctl.push((
                vec![("protocol", ct_proto(*p)), ("kind", kind.to_string())],
                *n as i64,
            ));
        }
        let gc = &self.shared.gc;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        counters(
            &mut enc,
            "weir_conntrack_gc_sweeps",
            "Conntrack sweeps of the housekeeping thread (every --ct-gc-interval-ms)",
            None,
            &one(load(&gc.ct_sweeps)),
        )?;
        counters(
            &mut enc,
            "weir_conntrack_gc_deleted_entries",
            "Conntrack entries the sweeps deleted (expired, and unchanged since they were read)",
            None,
            &one(load(&gc.ct_deleted)),
        )?;
        counters(
            &mut enc,
            "weir_sockets_destroyed",
            "Sockets socket LB had connected to a backend that is gone, destroyed with SOCK_DESTROY so that their owners see an error at once",
            None,
            &one(load(&gc.sockets_destroyed)),
        )?;
        counters(
            &mut enc,
            "weir_gc_errors",
            "Conntrack or socket sweeps that failed (the next one retries)",
            None,
            &one(load(&gc.errors)),
        )?;
        gauges(
            &mut enc,
            "weir_conntrack_entries",
            "Connection tracking entries by protocol and kind (flow: a connection's state and reverse translation; service: the backend a client's connection was given), from a scan every --conntrack-scan-ms",
            None,
            &ctl,
        )?;
        let mut entries: BTreeMap<&'static str, i64> = BTreeMap::new();
        for (m, n) in &snap.map_entries {
            entries.insert(m, *n as i64);
        }
        for (m, n) in &ct.maps {
            entries.insert(m, *n as i64);
        }
        entries.insert(
            names::POLICY_COUNTERS,
            snap.map_entries
                .get(names::POLICY_RULES)
                .copied()
                .unwrap_or(0) as i64,
        );
        entries.insert(names::SVC_COUNTERS, svc.len() as i64);
        gauges(
            &mut enc,
            "weir_map_entries",
            "Entries in each BPF map (maps the agent writes: as of the last sync; kernel-written LRU maps: as of the last scan)",
            None,
            &entries
                .iter()
                .filter(|(m, _)| snap.capacities.contains_key(*m))
                .map(|(m, n)| (vec![("map", m.to_string())], *n))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "weir_map_max_entries",
            "Capacity of each BPF map (--map-size)",
            None,
            &snap
                .capacities
                .iter()
                .map(|(m, n)| (vec![("map", m.to_string())], *n as i64))
                .collect::<Vec<_>>(),
        )?;

        // The sync loop.
        counters(
            &mut enc,
            "weir_syncs",
            "Syncs run (each turns a batch of object changes into map writes)",
            None,
            &one(snap.sync.syncs),
        )?;
        counters(
            &mut enc,
            "weir_map_operations",
            "Map writes and deletes applied",
            None,
            &one(snap.sync.ops_applied),
        )?;
        let mut errs: Vec<(Labels, u64)> = ["map_full", "map_write"]
            .iter()
            .map(|r| {
                (
                    vec![("reason", r.to_string())],
                    snap.sync.apply_errors.get(r).copied().unwrap_or(0),
                )
            })
            .collect();
        for (r, n) in &snap.sync.apply_errors {
            if !["map_full", "map_write"].contains(r) {
                errs.push((vec![("reason", r.to_string())], *n));
            }
        }
        errs.push((vec![("reason", "compile".into())], snap.sync.compile_errors));
        counters(
            &mut enc,
            "weir_sync_errors",
            "Sync failures by reason: map_full and map_write (a map write failed; the rest of the plan is retried), compile (a Service could not be compiled, e.g. more backends than slots; its previous state stays)",
            None,
            &errs,
        )?;
        // The maps a Service's change can be refused for (weir_core::sync admission).
        let mut refusable: Vec<&str> = vec![
            names::SERVICES,
            names::BACKENDS,
            names::REV_NAT,
            names::SOURCE_RANGES,
            names::MAGLEV,
            names::AFFINITY_SETS,
        ];
        for m in snap.sync.refused.keys() {
            if !refusable.contains(m) {
                refusable.push(m);
            }
        }
        let refused: Vec<(Labels, u64)> = refusable
            .iter()
            .map(|m| {
                (
                    vec![("map", m.to_string()), ("reason", "map_capacity".into())],
                    snap.sync.refused.get(m).copied().unwrap_or(0),
                )
            })
            .collect();
        counters(
            &mut enc,
            "weir_services_refused",
            "Services refused because their change would overflow a map (reason map_capacity), by map; each keeps what was programmed for it and is retried",
            None,
            &refused,
        )?;
        gauges(
            &mut enc,
            "weir_services_waiting",
            "Services currently refused for capacity, waiting for room",
            None,
            &[(vec![], snap.sync.refused_services as i64)],
        )?;
        gauges(
            &mut enc,
            "weir_deferred_deletions",
            "Map deletions held back until every source has delivered its initial list",
            None,
            &[(vec![], snap.sync.deferred_deletes as i64)],
        )?;
        gauges(
            &mut enc,
            "weir_last_sync_timestamp",
            "Unix time of the last sync that applied without error",
            Some(&Unit::Seconds),
            &[(vec![], snap.last_sync_unix.unwrap_or(0.0))],
        )?;

        // Sources and objects.
        let mut invalid = snap.invalid.clone();
        for k in crate::source::Kind::ALL {
            invalid.entry(k.name()).or_insert(0);
        }
        let mut objects = snap.objects.clone();
        for k in crate::source::Kind::ALL {
            objects.entry(k.name()).or_insert(0);
        }
        let (snap_objects, snap_invalid) = (objects, invalid);
        gauges(
            &mut enc,
            "weir_objects",
            "Cluster objects the agent knows, by kind",
            None,
            &snap_objects
                .iter()
                .map(|(k, n)| (vec![("kind", k.to_string())], *n as i64))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "weir_invalid_objects",
            "Objects whose latest version could not be used (their previous version stays in force), by kind",
            None,
            &snap_invalid
                .iter()
                .map(|(k, n)| (vec![("kind", k.to_string())], *n as i64))
                .collect::<Vec<_>>(),
        )?;
        counters(
            &mut enc,
            "weir_invalid_object_updates",
            "Object versions that failed validation",
            None,
            &one(snap.store.invalid),
        )?;
        counters(
            &mut enc,
            "weir_source_events",
            "Events from the sources (watch events, directory changes, list items)",
            None,
            &one(snap.store.events),
        )?;
        counters(
            &mut enc,
            "weir_source_lists",
            "Complete (re-)lists received from the sources",
            None,
            &one(snap.store.lists),
        )?;
        use std::sync::atomic::Ordering::Relaxed;
        counters(
            &mut enc,
            "weir_watch_errors",
            "API server list and watch errors (each is retried with backoff)",
            None,
            &one(s.kube.errors.load(Relaxed)),
        )?;

        // Flow events.
        let stats = match &s.kernel {
            Some(k) => k.event_stats().unwrap_or_default(),
            None => BTreeMap::new(),
        };
        let mut ev = Vec::new();
        for (class, cname) in [(CLASS_DROP, "drop"), (CLASS_FLOW, "flow")] {
            for (st, sname) in [
                (STAT_EMITTED, "emitted"),
                (STAT_RATE_LIMITED, "rate_limited"),
                (STAT_RING_FULL, "ring_full"),
                (STAT_NOT_SAMPLED, "not_sampled"),
            ] {
                if class == CLASS_DROP && st == STAT_NOT_SAMPLED {
                    continue;
                }
                ev.push((
                    vec![("class", cname.into()), ("outcome", sname.into())],
                    stats.get(&stat_index(class, st)).copied().unwrap_or(0),
                ));
            }
        }
        counters(
            &mut enc,
            "weir_flow_events",
            "Flow events in the datapath by class (drop: drops and rejects; flow: sampled new connections) and outcome: emitted to the ring, or suppressed (rate_limited by the per-CPU token bucket, ring_full because the agent fell behind, not_sampled)",
            None,
            &ev,
        )?;
        let received = s.events.received.lock().expect("lock").clone();
        counters(
            &mut enc,
            "weir_flow_events_received",
            "Flow events the agent read from the ring, by kind (drop, reject, new)",
            None,
            &[(EV_DROP, "drop"), (EV_REJECT, "reject"), (EV_NEW, "new")]
                .iter()
                .map(|(k, n)| {
                    (
                        vec![("kind", n.to_string())],
                        received.get(k).copied().unwrap_or(0),
                    )
                })
                .collect::<Vec<_>>(),
        )?;

        // Health.
        gauges(
            &mut enc,
            "weir_ready",
            "1 once every source has listed, the datapath is attached and the last sync applied (what /readyz answers)",
            None,
            &[(vec![], snap.ready as i64)],
        )?;
        let h = &s.health;
        counters(
            &mut enc,
            "weir_proxy_healthz",
            "Requests to the node health server's /healthz, by response code (kube-proxy's proxy_healthz_total)",
            None,
            &[
                (vec![("code", "200".into())], h.healthz_200.load(Relaxed)),
                (vec![("code", "503".into())], h.healthz_503.load(Relaxed)),
            ],
        )?;
        counters(
            &mut enc,
            "weir_proxy_livez",
            "Requests to the node health server's /livez, by response code (kube-proxy's proxy_livez_total)",
            None,
            &[
                (vec![("code", "200".into())], h.livez_200.load(Relaxed)),
                (vec![("code", "503".into())], h.livez_503.load(Relaxed)),
            ],
        )?;
        Ok(())
    }
}
