//! Connection tracking.
//!
//! One LRU hash, two kinds of entries (the split Cilium uses between CT_SERVICE and
//! regular entries, bpf/lib/conntrack.h):
//!
//! - [`CT_KIND_SVC`], keyed by the tuple the client sent (client -> frontend): which
//!   backend this connection was given and how to rewrite its forward packets. Every
//!   forward packet of a load-balanced connection hits it, so the backend stays fixed.
//! - [`CT_KIND_FLOW`], keyed by the tuple on the wire after translation, in the
//!   direction of the first packet: connection state, timestamps, and for translated
//!   flows the addresses a reply must be rewritten back to. A reply finds it by looking
//!   up its own tuple reversed.
//!
//! Timestamps are `bpf_ktime_get_ns()` (CLOCK_MONOTONIC); the agent's GC compares them
//! with `clock_gettime(CLOCK_MONOTONIC)` and the per-state timeouts below.

use crate::Addr;

pub const CT_KIND_FLOW: u8 = 0;
pub const CT_KIND_SVC: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub kind: u8,
    pub pad: [u8; 2],
}
crate::assert_layout!(
    CtKey,
    size = 40,
    dst = 16,
    sport_be = 32,
    dport_be = 34,
    proto = 36,
    kind = 37
);

impl CtKey {
    /// The key a reply to a packet with this tuple carries.
    #[inline(always)]
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            src: self.dst,
            dst: self.src,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            kind: self.kind,
            pad: [0; 2],
        }
    }
}

/// The entry rewrites: DNAT on forward packets (SVC) / reverse DNAT on replies (FLOW).
pub const CT_F_DNAT: u16 = 1 << 0;
/// Source was masqueraded (SVC: rewrite the source too; FLOW: restore the client).
pub const CT_F_SNAT: u16 = 1 << 1;
/// A packet in the reply direction was seen.
pub const CT_F_SEEN_REPLY: u16 = 1 << 2;
/// TCP: FIN seen from the originator / from the responder.
pub const CT_F_FIN_FWD: u16 = 1 << 3;
pub const CT_F_FIN_REV: u16 = 1 << 4;
/// TCP: RST seen.
pub const CT_F_RST: u16 = 1 << 5;
/// NetworkPolicy: the source pod's egress allowed this flow on this node.
pub const CT_F_EGRESS_OK: u16 = 1 << 6;
/// NetworkPolicy: the destination pod's ingress allowed this flow on this node.
pub const CT_F_INGRESS_OK: u16 = 1 << 7;
/// The flow was opened by a TCP SYN (so state tracking applies).
pub const CT_F_SYN: u16 = 1 << 8;
/// Created by `tc_to_pod` (a flow into an isolated pod that no other hook of this node
/// tracks): that hook keeps its timestamps and counters. Entries other hooks created are
/// only marked there (`CT_F_INGRESS_OK`), so that a packet is counted once per node.
pub const CT_F_TO_POD: u16 = 1 << 9;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct CtEntry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// SVC: the source to write on forward packets (the client itself unless SNAT).
    /// FLOW: the destination to write on replies (the original client).
    pub nat_src: Addr,
    /// SVC: the backend to write as destination of forward packets.
    /// FLOW: the source to write on replies (the frontend the client used).
    pub nat_dst: Addr,
    pub nat_sport_be: u16,
    pub nat_dport_be: u16,
    /// `CT_F_*`.
    pub flags: u16,
    /// TCP flags seen, originator direction / reply direction (OR of the header bytes).
    pub tcp_fwd: u8,
    pub tcp_rev: u8,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub packets: u64,
    pub bytes: u64,
}
crate::assert_layout!(
    CtEntry,
    size = 80,
    nat_src = 16,
    nat_dst = 32,
    nat_sport_be = 48,
    flags = 52,
    backend_id = 56,
    packets = 64
);

/// Idle timeouts (seconds), Cilium's defaults (`--bpf-ct-timeout-*`).
pub const CT_TIMEOUT_TCP_SYN_S: u64 = 60;
pub const CT_TIMEOUT_TCP_ESTABLISHED_S: u64 = 21600;
pub const CT_TIMEOUT_TCP_CLOSING_S: u64 = 10;
pub const CT_TIMEOUT_OTHER_S: u64 = 60;

impl CtEntry {
    /// Idle timeout of this entry given its protocol and state.
    pub const fn timeout_ns(&self, proto: u8) -> u64 {
        let s = if proto == crate::proto::TCP {
            if self.flags & (CT_F_RST | CT_F_FIN_FWD | CT_F_FIN_REV) != 0 {
                CT_TIMEOUT_TCP_CLOSING_S
            } else if self.flags & CT_F_SEEN_REPLY != 0 {
                CT_TIMEOUT_TCP_ESTABLISHED_S
            } else {
                CT_TIMEOUT_TCP_SYN_S
            }
        } else {
            CT_TIMEOUT_OTHER_S
        };
        s * 1_000_000_000
    }

    pub const fn expired(&self, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.timeout_ns(proto)
    }
}

crate::impl_pod!(CtKey, CtEntry);
