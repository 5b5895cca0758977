//! Flow and drop events on the `EVENTS` ring buffer, rate-limited per CPU, and the
//! per-Service-port counters (see `weir_common::events`).
//!
//! The rate limiter is a token bucket per CPU and event class in `EVENT_BUCKETS`, kept in
//! nanoseconds of credit: an event costs `EVENT_COST_NS` (1e9 / rate) and credit grows
//! with elapsed time up to `EVENT_BURST_NS`. Both are read-only globals the agent sets at
//! load time, so the datapath divides nothing. A TC program runs to completion on its
//! CPU, so the per-CPU bucket needs no atomics.

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use weir_common::events::*;

use crate::maps::{EVENT_BUCKETS, EVENT_STATS, EVENTS, SVC_COUNTERS, Work};

/// Nanoseconds of credit one event costs (1e9 / events per second).
#[unsafe(no_mangle)]
static EVENT_COST_NS: Global<u64> = Global::new(1_000_000_000 / DEFAULT_EVENT_RATE);
/// Most credit a bucket holds (cost x burst).
#[unsafe(no_mangle)]
static EVENT_BURST_NS: Global<u64> =
    Global::new(1_000_000_000 / DEFAULT_EVENT_RATE * DEFAULT_EVENT_BURST);
/// One new-connection event in this many (1: all).
#[unsafe(no_mangle)]
static FLOW_SAMPLE: Global<u32> = Global::new(1);

#[inline(always)]
fn stat(class: u32, which: u32) {
    if let Some(c) = EVENT_STATS.get_ptr_mut(stat_index(class, which)) {
        unsafe { *c += 1 };
    }
}

/// Takes one event's worth of credit from this CPU's bucket of `class`.
#[inline(always)]
fn admit(class: u32, now: u64) -> bool {
    let Some(b) = EVENT_BUCKETS.get_ptr_mut(class) else {
        return false;
    };
    let (cost, burst) = (EVENT_COST_NS.load(), EVENT_BURST_NS.load());
    unsafe {
        // A fresh bucket (last_ns 0) starts full.
        let mut credit = (*b)
            .credit_ns
            .saturating_add(now.saturating_sub((*b).last_ns));
        if credit > burst {
            credit = burst;
        }
        (*b).last_ns = now;
        if credit >= cost {
            (*b).credit_ns = credit - cost;
            true
        } else {
            (*b).credit_ns = credit;
            false
        }
    }
}

/// `emit`'s packed argument: kind | reason << 8 | direction << 16 | hook << 24 (a
/// subprogram takes at most 5 arguments, each in one register).
#[inline(always)]
pub const fn pack(kind: u8, reason: u8, dir: u8, hook: u8) -> u32 {
    kind as u32 | (reason as u32) << 8 | (dir as u32) << 16 | (hook as u32) << 24
}

/// Emits one event about the packet in `w` (addresses and ports as parsed), if the
/// class's bucket has credit and the ring has room; counts the outcome.
#[inline(never)]
pub fn emit(ctx: &TcContext, w: &Work, packed: u32) {
    let kind = packed as u8;
    let class = if kind == EV_NEW {
        CLASS_FLOW
    } else {
        CLASS_DROP
    };
    if kind == EV_NEW {
        let n = FLOW_SAMPLE.load();
        if n > 1 && unsafe { bpf_get_prandom_u32() }.checked_rem(n).unwrap_or(0) != 0 {
            stat(class, STAT_NOT_SAMPLED);
            return;
        }
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if !admit(class, now) {
        stat(class, STAT_RATE_LIMITED);
        return;
    }
    let Some(mut e) = EVENTS.reserve::<FlowEvent>(0) else {
        stat(class, STAT_RING_FULL);
        return;
    };
    let new = kind == EV_NEW;
    e.write(FlowEvent {
        ts_ns: now,
        kind,
        direction: (packed >> 16) as u8,
        reason: (packed >> 8) as u8,
        proto: w.pkt.proto,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        src: w.pkt.src,
        dst: w.pkt.dst,
        sport_be: w.pkt.sport_be,
        dport_be: w.pkt.dport_be,
        // The policy stages record their decision in `Work::event` (policy.rs).
        rule_id: if w.event.kind == weir_common::policy::EVENT_POLICY_DROP {
            w.event.rule_id
        } else {
            w.verdict_rule
        },
        len: w.pkt.len,
        svc_port_id: w.svc_port_id,
        nat_dst: if new {
            w.be.addr
        } else {
            weir_common::Addr::ZERO
        },
        nat_dport_be: if new { w.be.port_be } else { 0 },
        hook: (packed >> 24) as u8,
        pad: 0,
        backend_id: if new { w.be_id } else { 0 },
    });
    e.submit(0);
    stat(class, STAT_EMITTED);
}

/// Counts a packet translated towards a backend of Service port `id` (and a new
/// connection if `new`).
#[inline(always)]
pub fn count_service(id: u32, bytes: u32, new: bool) {
    if id == 0 {
        return;
    }
    let c = match SVC_COUNTERS.get_ptr_mut(id) {
        Some(c) => c,
        None => {
            // First packet of this Service port on this CPU's view: create the entry
            // (zeroed on every CPU), then count into it.
            let _ = SVC_COUNTERS.insert(&id, &SvcCounter::default(), BPF_NOEXIST as u64);
            match SVC_COUNTERS.get_ptr_mut(id) {
                Some(c) => c,
                None => return,
            }
        }
    };
    unsafe {
        (*c).packets += 1;
        (*c).bytes += bytes as u64;
        if new {
            (*c).new_conns += 1;
        }
    }
}

/// Counts a new connection of Service port `id` made by a socket-level connect. Socket
/// programs run in process context with migration (not preemption) disabled: another
/// task on this CPU could run the same program between the load and the store and one
/// of two increments would be lost. That window is a few instructions wide; the BPF
/// target has no 64-bit atomic add in stable Rust (no `fetch_add`), so the counter
/// accepts that rare loss rather than a lock.
#[inline(always)]
pub fn count_service_connect(id: u32) {
    if id == 0 {
        return;
    }
    if SVC_COUNTERS.get_ptr_mut(id).is_none() {
        let _ = SVC_COUNTERS.insert(&id, &SvcCounter::default(), BPF_NOEXIST as u64);
    }
    if let Some(c) = SVC_COUNTERS.get_ptr_mut(id) {
        unsafe { (*c).new_conns += 1 };
    }
}
