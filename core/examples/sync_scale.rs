//! Control-plane scale: programs N Services with M endpoints each (default 10k x 10 =
//! 100k endpoints) into the FakeDatapath through the real sync path (incremental
//! pipeline + Syncer), then flips one endpoint, and prints times, ops, work counters and
//! memory. A measurement, not a test: nothing here asserts on time.
//!
//! ```text
//! cargo run --release -p weir-core --example sync_scale [SERVICES] [ENDPOINTS_PER_SERVICE] [FLIPS]
//! ```
//!
//! Memory is the heap the pipeline and the fake maps hold (a counting allocator), after
//! the full program and at its peak.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use weir_core::{
    datapath::FakeDatapath,
    image::MapImage,
    model::*,
    pipeline::{ChangeSet, NodeSettings},
    sync::{SyncInput, Syncer},
};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// CPU time of this thread (not counting time other processes had the CPU: the machine
/// these numbers come from is shared).
fn cpu_now() -> std::time::Duration {
    let mut ts = libc_timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[repr(C)]
struct libc_timespec {
    tv_sec: i64,
    tv_nsec: i64,
}
const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
unsafe extern "C" {
    fn clock_gettime(clk: i32, ts: *mut libc_timespec) -> i32;
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn cluster(n: usize, per: usize) -> Cluster {
    let mut c = Cluster::default();
    for i in 0..n {
        let name = format!("svc-{i}");
        let id = ObjRef::new("bench", &name);
        let vip: IpAddr = format!("10.96.{}.{}", i / 250, i % 250 + 1)
            .parse()
            .unwrap();
        c.services.insert(
            id.clone(),
            Service {
                id: id.clone(),
                cluster_ips: vec![vip],
                ports: vec![ServicePort {
                    name: "http".into(),
                    protocol: Protocol::TCP,
                    port: 80,
                    node_port: 0,
                }],
                ..Default::default()
            },
        );
        let sid = ObjRef::new("bench", format!("{name}-abcde"));
        c.slices.insert(
            sid.clone(),
            EndpointSlice {
                id: sid,
                trigger_time_unix_ns: None,
                service: Some(name),
                address_type: AddressType::IPv4,
                ports: vec![EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::TCP,
                    port: 8080,
                }],
                endpoints: (0..per)
                    .map(|j| {
                        let k = i * per + j;
                        Endpoint {
                            addresses: vec![
                                format!(
                                    "10.{}.{}.{}",
                                    64 + k / 62500,
                                    (k / 250) % 250,
                                    k % 250 + 1
                                )
                                .parse()
                                .unwrap(),
                            ],
                            ready: Some(true),
                            node_name: Some(format!("node-{}", k % 100)),
                            ..Default::default()
                        }
                    })
                    .collect(),
            },
        );
    }
    c
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let n = args.first().copied().unwrap_or(10_000);
    let per = args.get(1).copied().unwrap_or(10);
    let mut c = cluster(n, per);
    let model_bytes = LIVE.load(Ordering::Relaxed);
    println!(
        "cluster: {n} Services x {per} endpoints = {} endpoints (model objects: {:.1} MiB)",
        n * per,
        mib(model_bytes)
    );

    let mut dp = FakeDatapath::default();
    let mut s = Syncer::new(
        NodeSettings {
            node_name: "node-0".into(),
            ..Default::default()
        },
        MapImage::default(),
        Default::default(),
    );
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let t = Instant::now();
    let cpu = cpu_now();
    let r = s.sync(
        SyncInput {
            cluster: &c,
            changes: &ChangeSet::everything(),
            sources_synced: true,
            generation: 1,
        },
        &mut dp,
    );
    let full = t.elapsed();
    let full_cpu = cpu_now() - cpu;
    let after = LIVE.load(Ordering::Relaxed);
    println!(
        "full program: {:.1} ms ({:.1} ms CPU), {} ops, {} Services translated; maps: {} SERVICES, {} BACKENDS, {} REV_NAT entries",
        full.as_secs_f64() * 1e3,
        full_cpu.as_secs_f64() * 1e3,
        r.ops,
        r.translations,
        dp.image.services.len(),
        dp.image.backends.len(),
        dp.image.rev_nat.len()
    );
    // The fake's op log is test bookkeeping, not agent memory: drop it before measuring.
    dp.log = Vec::new();
    let held = LIVE.load(Ordering::Relaxed) - model_bytes;
    println!(
        "memory: pipeline + syncer + fake maps hold {:.1} MiB after the program (peak during it {:.1} MiB above the model; {:.1} MiB incl. the fake's op log)",
        mib(held),
        mib(PEAK.load(Ordering::Relaxed) - model_bytes),
        mib(after - model_bytes)
    );

    // One endpoint flips (ready -> not ready), then back; repeated over different
    // Services.
    let rounds = args.get(2).copied().unwrap_or(1000);
    let mut total = std::time::Duration::ZERO;
    let mut total_cpu = std::time::Duration::ZERO;
    let mut worst = std::time::Duration::ZERO;
    let (mut ops, mut translations, mut touched) = (0, 0, 0);
    for round in 0..rounds {
        let sid = ObjRef::new("bench", format!("svc-{}-abcde", (round * 7919) % n));
        let e = &mut c.slices.get_mut(&sid).unwrap().endpoints[round % per];
        e.ready = Some(!e.ready.unwrap_or(true));
        let changes = ChangeSet {
            slices: [sid].into(),
            ..Default::default()
        };
        let t = Instant::now();
        let cpu = cpu_now();
        let r = s.sync(
            SyncInput {
                cluster: &c,
                changes: &changes,
                sources_synced: true,
                generation: 1,
            },
            &mut dp,
        );
        let d = t.elapsed();
        total_cpu += cpu_now() - cpu;
        total += d;
        worst = worst.max(d);
        ops += r.ops;
        translations += r.translations;
        touched += r.touched;
    }
    println!(
        "one endpoint flip: {:.1} us on average ({:.1} us CPU), {:.1} us worst over {rounds} flips; per flip {:.1} ops, {:.1} Services translated, {:.1} keys diffed",
        total.as_secs_f64() * 1e6 / rounds as f64,
        total_cpu.as_secs_f64() * 1e6 / rounds as f64,
        worst.as_secs_f64() * 1e6,
        ops as f64 / rounds as f64,
        translations as f64 / rounds as f64,
        touched as f64 / rounds as f64
    );

    // For comparison: the same flip handled by recomputing and diffing everything
    // (what the agent did before the incremental pipeline).
    let sid = ObjRef::new("bench", "svc-0-abcde");
    let e = &mut c.slices.get_mut(&sid).unwrap().endpoints[0];
    e.ready = Some(!e.ready.unwrap_or(true));
    let t = Instant::now();
    let cpu = cpu_now();
    let r = s.sync(
        SyncInput {
            cluster: &c,
            changes: &ChangeSet::everything(),
            sources_synced: true,
            generation: 1,
        },
        &mut dp,
    );
    println!(
        "the same flip as a full recomputation: {:.1} ms ({:.1} ms CPU), {} ops, {} Services translated",
        t.elapsed().as_secs_f64() * 1e3,
        (cpu_now() - cpu).as_secs_f64() * 1e3,
        r.ops,
        r.translations
    );
    assert_eq!(dp.image, *s.desired());
}
