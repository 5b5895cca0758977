//! Flow and drop events, per-Service counters and kernel log lines, through
//! BPF_PROG_TEST_RUN on the real programs: what lands on the `EVENTS` ring for drops,
//! rejects and new connections, the per-CPU token bucket under a flood (and what it
//! counts as suppressed), a full ring, `SVC_COUNTERS`, and an aya-log line of the kernel
//! side reaching the agent's tracing at debug level.

mod support;

use std::{
    io::Write as _,
    sync::{Arc, Mutex},
};

use support::*;
use weir::{
    datapath::{EventSettings, Hook},
    metrics::{KernelCounters as _, kernel::AyaKernelCounters},
    testing::{
        packet::{self, ACK, SYN, sock},
        prog::{ProgHarness, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    },
};
use weir_common::{Addr, config::CFG_F_FLOW_EVENTS, events::*, metrics::*, proto};
use weir_core::{
    image::MapImage,
    model::{Cluster, Protocol::*},
    pipeline::Pipeline,
};

/// Runs the test thread on one CPU: the token buckets are per CPU.
fn pin_to_one_cpu() {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

fn image_with_flags(c: &Cluster, flags: u32) -> MapImage {
    let mut s = settings();
    s.flags |= flags;
    let mut p = Pipeline::new(s);
    let (img, errs) = p.desired(c, 1);
    assert!(errs.is_empty(), "{errs:?}");
    img
}

fn cluster(svcs: Vec<Svc>) -> Cluster {
    let mut c = Cluster::default();
    add_nodes(&mut c);
    for s in svcs {
        s.add(&mut c);
    }
    c
}

fn harness(ev: &EventSettings, img: &MapImage) -> ProgHarness {
    require_root();
    let mut h = ProgHarness::with_events(ev).expect("load datapath");
    h.program(img).expect("program maps");
    h
}

type Ring = aya::maps::RingBuf<aya::maps::MapData>;

fn drain(ring: &mut Ring) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= std::mem::size_of::<FlowEvent>());
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) });
    }
    out
}

fn stats(h: &ProgHarness) -> std::collections::BTreeMap<u32, u64> {
    AyaKernelCounters::open(&h.pin_dir)
        .unwrap()
        .event_stats()
        .unwrap()
}

fn addr(s: &str) -> Addr {
    Addr::from_ip(s.parse().unwrap())
}

/// The svc_port_id of the frontend at `vip:port` (TCP).
fn svc_port_id(img: &MapImage, vip: &str, port: u16) -> u32 {
    img.services
        .iter()
        .find(|(k, _)| k.addr == addr(vip) && k.port_be == port.to_be() && k.slot == 0)
        .map(|(_, v)| v.svc_port_id)
        .expect("frontend")
}

#[test]
fn a_reject_and_a_drop_emit_events_naming_the_packet() {
    pin_to_one_cpu();
    let c = cluster(vec![
        Svc::new("empty", &["10.96.0.10"]).port("http", 80, 8080, TCP),
    ]);
    let img = image_with_flags(&c, 0);
    let mut h = harness(&EventSettings::default(), &img);
    let mut ring = h.dataplane.take_events().unwrap();

    // No endpoints: the SYN is rejected (RST).
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(sock("10.244.1.5", 40000), sock("10.96.0.10", 80), SYN, b""),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "rejected: a reset sent back");
    // An unallocated address of the service CIDR: dropped.
    let r = h
        .run(
            Hook::UplinkIn,
            &packet::udp(sock("203.0.113.9", 5353), sock("10.96.9.9", 53), b"q"),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);

    let ev = drain(&mut ring);
    assert_eq!(ev.len(), 2, "{ev:?}");
    let e = &ev[0];
    assert_eq!(e.kind, EV_REJECT);
    assert_eq!(e.reason, REASON_NO_BACKEND_REJECT);
    assert_eq!(e.direction, DIR_EGRESS);
    assert_eq!(e.hook, HOOK_FROM_POD);
    assert_eq!(e.proto, proto::TCP);
    assert_eq!(e.src, addr("10.244.1.5"));
    assert_eq!(
        e.dst,
        addr("10.96.0.10"),
        "the packet as it arrived, before the reset"
    );
    assert_eq!(
        (u16::from_be(e.sport_be), u16::from_be(e.dport_be)),
        (40000, 80)
    );
    assert_eq!(e.svc_port_id, svc_port_id(&img, "10.96.0.10", 80));
    assert_eq!(e.rule_id, 0);
    assert!(e.ts_ns > 0 && e.len >= 40);
    assert_ne!(e.ifindex, 0);
    let e = &ev[1];
    assert_eq!(e.kind, EV_DROP);
    assert_eq!(e.reason, REASON_UNALLOCATED_SERVICE_IP);
    assert_eq!(e.direction, DIR_INGRESS);
    assert_eq!(e.hook, HOOK_UPLINK_IN);
    assert_eq!((e.proto, e.svc_port_id), (proto::UDP, 0));
    let st = stats(&h);
    assert_eq!(st[&stat_index(CLASS_DROP, STAT_EMITTED)], 2);
    assert_eq!(st[&stat_index(CLASS_DROP, STAT_RATE_LIMITED)], 0);
}

#[test]
fn translated_packets_are_counted_per_service_port_with_new_connections() {
    pin_to_one_cpu();
    let c = cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .ep("10.244.2.7", REMOTE),
    ]);
    let img = image_with_flags(&c, 0);
    let h = harness(&EventSettings::default(), &img);
    let (cl, vip) = (sock("10.244.1.5", 40000), sock("10.96.0.10", 80));
    let syn = packet::tcp(cl, vip, SYN, b"");
    let ack = packet::tcp(cl, vip, ACK, b"hello");
    let mut bytes = 0u64;
    for f in [&syn, &ack, &ack] {
        let r = h.run(Hook::FromPod, f).unwrap();
        assert_eq!(r.verdict, TC_ACT_OK);
        assert_eq!(r.parsed().dst.to_string(), "10.244.2.7");
        // Lengths as the hook sees the packet (skb->len: the whole frame).
        bytes += f.len() as u64;
    }
    // A second connection from another port.
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(sock("10.244.1.5", 40001), vip, SYN, b""),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    bytes += syn.len() as u64;
    let k = AyaKernelCounters::open(&h.pin_dir).unwrap();
    let svc = k.services().unwrap();
    let id = svc_port_id(&img, "10.96.0.10", 80);
    assert_eq!(
        svc[&id],
        SvcCounter {
            packets: 4,
            bytes,
            new_conns: 2
        },
        "{svc:?}"
    );
    // The datapath counters saw the same packets as translated.
    let dp = k.datapath().unwrap();
    assert_eq!(dp[&index(REASON_TRANSLATED, DIR_EGRESS)].packets, 4);
    // Forgetting the id (the agent does when it releases it) starts it from zero.
    k.forget_services(&[id]);
    assert!(k.services().unwrap().is_empty());
}

#[test]
fn new_connection_events_are_emitted_only_with_cfg_flow_events_and_sampled() {
    pin_to_one_cpu();
    let c = cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .ep("10.244.2.7", REMOTE),
    ]);
    let vip = sock("10.96.0.10", 80);
    let conns = |h: &ProgHarness, n: u16| {
        for i in 0..n {
            let r = h
                .run(
                    Hook::FromPod,
                    &packet::tcp(sock("10.244.1.5", 41000 + i), vip, SYN, b""),
                )
                .unwrap();
            assert_eq!(r.verdict, TC_ACT_OK);
            // The connection's next packet is not a new connection.
            let r = h
                .run(
                    Hook::FromPod,
                    &packet::tcp(sock("10.244.1.5", 41000 + i), vip, ACK, b""),
                )
                .unwrap();
            assert_eq!(r.verdict, TC_ACT_OK);
        }
    };
    // Off: nothing.
    let mut h = harness(&EventSettings::default(), &image_with_flags(&c, 0));
    let mut ring = h.dataplane.take_events().unwrap();
    conns(&h, 3);
    assert!(drain(&mut ring).is_empty());
    drop(h);

    // On: one event per new connection, naming the backend.
    let img = image_with_flags(&c, CFG_F_FLOW_EVENTS);
    let mut h = harness(&EventSettings::default(), &img);
    let mut ring = h.dataplane.take_events().unwrap();
    conns(&h, 3);
    let ev = drain(&mut ring);
    assert_eq!(ev.len(), 3, "{ev:?}");
    for (i, e) in ev.iter().enumerate() {
        assert_eq!((e.kind, e.reason), (EV_NEW, REASON_TRANSLATED));
        assert_eq!(e.dst, addr("10.96.0.10"));
        assert_eq!(u16::from_be(e.sport_be), 41000 + i as u16);
        assert_eq!(e.nat_dst, addr("10.244.2.7"));
        assert_eq!(u16::from_be(e.nat_dport_be), 8080);
        assert_ne!(e.backend_id, 0);
        assert_eq!(e.svc_port_id, svc_port_id(&img, "10.96.0.10", 80));
    }
    assert_eq!(stats(&h)[&stat_index(CLASS_FLOW, STAT_EMITTED)], 3);
    drop(h);

    // Sampled one in four: emitted + not sampled = connections.
    let mut h = harness(
        &EventSettings {
            flow_sample: 4,
            ..Default::default()
        },
        &img,
    );
    let mut ring = h.dataplane.take_events().unwrap();
    conns(&h, 40);
    let got = drain(&mut ring).len() as u64;
    let st = stats(&h);
    assert_eq!(st[&stat_index(CLASS_FLOW, STAT_EMITTED)], got);
    assert_eq!(got + st[&stat_index(CLASS_FLOW, STAT_NOT_SAMPLED)], 40);
    assert!(got < 40, "sampling suppressed some ({got} of 40)");
}

#[test]
fn a_flood_is_rate_limited_by_the_token_bucket_and_counted() {
    pin_to_one_cpu();
    let c = cluster(vec![]);
    // 1 event per second, bursts of 5.
    let mut h = harness(
        &EventSettings {
            rate: 1,
            burst: 5,
            flow_sample: 1,
        },
        &image_with_flags(&c, 0),
    );
    let mut ring = h.dataplane.take_events().unwrap();
    let frame = packet::udp(sock("203.0.113.9", 5353), sock("10.96.9.9", 53), b"q");
    let started = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(h.run(Hook::UplinkIn, &frame).unwrap().verdict, TC_ACT_SHOT);
    }
    // Credit grows by one event per second: the burst, plus what the run's own
    // duration refilled.
    let refill = started.elapsed().as_secs() + 1;
    let got = drain(&mut ring).len() as u64;
    let st = stats(&h);
    assert_eq!(st[&stat_index(CLASS_DROP, STAT_EMITTED)], got);
    assert_eq!(got + st[&stat_index(CLASS_DROP, STAT_RATE_LIMITED)], 50);
    assert!(got >= 5 && got <= 5 + refill, "{got} events emitted");
    // Every drop is still counted in METRICS, events or not.
    let k = AyaKernelCounters::open(&h.pin_dir).unwrap();
    assert_eq!(
        k.datapath().unwrap()[&index(REASON_UNALLOCATED_SERVICE_IP, DIR_INGRESS)].packets,
        50
    );
}

#[test]
fn a_full_ring_is_counted_as_lost() {
    pin_to_one_cpu();
    let c = cluster(vec![]);
    let mut h = harness(
        &EventSettings {
            rate: 1_000_000_000,
            burst: 1_000_000,
            flow_sample: 1,
        },
        &image_with_flags(&c, 0),
    );
    let mut ring = h.dataplane.take_events().unwrap();
    let frame = packet::udp(sock("203.0.113.9", 5353), sock("10.96.9.9", 53), b"q");
    // A drop leaves the packet as it is, so the kernel's repeat runs the same drop.
    let n = 5000;
    let r = h.run_repeat(Hook::UplinkIn, &frame, n).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    let got = drain(&mut ring).len() as u64;
    let st = stats(&h);
    let lost = st[&stat_index(CLASS_DROP, STAT_RING_FULL)];
    assert_eq!(st[&stat_index(CLASS_DROP, STAT_EMITTED)], got);
    assert_eq!(got + lost, n as u64);
    assert!(
        lost > 0,
        "a ring of {EVENTS_RING_BYTES} bytes holds fewer than {n} events"
    );
}

/// A writer collecting what the tracing subscriber prints.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_kernel_log_line_reaches_tracing_at_debug_level() {
    let out = Captured::default();
    let w = out.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("weir::ebpf=debug"))
        .with_writer(move || w.clone())
        .with_ansi(false)
        .init();
    // No node addresses: nothing to masquerade with. A client outside the cluster CIDR
    // reaching a ClusterIP must be masqueraded, so the translation fails: dropped, and
    // the datapath says why in a log line.
    let mut c = Cluster::default();
    Svc::new("web", &["10.96.0.10"])
        .port("http", 80, 8080, TCP)
        .ep("10.244.2.7", REMOTE)
        .add(&mut c);
    let mut h = harness(&EventSettings::default(), &image_with_flags(&c, 0));
    let r = h
        .run(
            Hook::UplinkIn,
            &packet::tcp(
                sock("192.168.77.5", 40000),
                sock("10.96.0.10", 80),
                SYN,
                b"",
            ),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    h.dataplane.flush_kernel_logs();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("NAT failed, packet dropped"))
        .unwrap_or_else(|| panic!("no kernel log line in:\n{text}"));
    assert!(line.contains("DEBUG"), "{line}");
    assert!(line.contains("weir::ebpf"), "{line}");
    assert!(line.contains("protocol 6 destination port 80"), "{line}");
    let _ = std::io::stdout().flush();
}

/// A restarted agent loads the programs anew and adopts the pinned maps: the datapath
/// and per-Service counters (what `weir_datapath_*` and `weir_service_*` export) carry
/// on from where they were instead of starting from zero, and the new programs add to
/// them.
#[test]
fn counters_carry_on_across_a_reload_of_the_datapath() {
    use aya::programs::{TestRun as _, TestRunOptions};
    use weir::datapath::{Dataplane, LoadOptions};

    pin_to_one_cpu();
    let c = cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .ep("10.244.2.7", REMOTE),
    ]);
    let img = image_with_flags(&c, 0);
    let h = harness(&EventSettings::default(), &img);
    let id = svc_port_id(&img, "10.96.0.10", 80);
    let vip = sock("10.96.0.10", 80);
    let syn = |port| packet::tcp(sock("10.244.1.5", port), vip, SYN, b"");
    for port in [40000, 40001] {
        assert_eq!(h.run(Hook::FromPod, &syn(port)).unwrap().verdict, TC_ACT_OK);
    }
    let before = AyaKernelCounters::open(&h.pin_dir).unwrap();
    let (dp0, svc0) = (before.datapath().unwrap(), before.services().unwrap());
    assert_eq!(dp0[&index(REASON_TRANSLATED, DIR_EGRESS)].packets, 2);
    assert_eq!((svc0[&id].packets, svc0[&id].new_conns), (2, 2));
    drop(before);

    // The "restarted agent": a second load of the object on the same pin directory
    // (fresh programs, adopted maps), and counters opened anew from the pins.
    let again = Dataplane::load_with_events(
        &LoadOptions {
            pin_dir: h.pin_dir.clone(),
            capacities: Default::default(),
        },
        &EventSettings::default(),
    )
    .expect("reload on the same pins");
    let after = AyaKernelCounters::open(&h.pin_dir).unwrap();
    assert_eq!(
        after.datapath().unwrap(),
        dp0,
        "nothing reset by the reload"
    );
    assert_eq!(after.services().unwrap(), svc0);

    let frame = syn(40002);
    let mut out = vec![0u8; frame.len() + 256];
    let r = again
        .program(Hook::FromPod)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.return_value as i32, TC_ACT_OK);
    let dp1 = after.datapath().unwrap();
    let svc1 = after.services().unwrap();
    assert_eq!(dp1[&index(REASON_TRANSLATED, DIR_EGRESS)].packets, 3);
    assert_eq!((svc1[&id].packets, svc1[&id].new_conns), (3, 3));
    drop(again);
}
