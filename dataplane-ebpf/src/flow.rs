//! The per-packet pipeline shared by the TC entry points.
//!
//! Every hook first asks conntrack whether the packet is a reply of a tracked flow
//! (reverse translation happens at the first hook on the node that sees the reply,
//! before routing, which a masqueraded reply needs); then whether it is addressed to a
//! Service frontend (translate and track); otherwise it passes.
//!
//! Stages are BPF-to-BPF calls (`#[inline(never)]`) sharing the per-CPU [`Work`] slot:
//! each gets its own small stack frame (the 512-byte limit applies to a whole call
//! chain) and the verifier checks each once. Upstream rules implemented here are cited
//! where they apply (kubernetes pkg/proxy/nftables/proxier.go unless noted; see
//! docs/upstream-services.md).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::{
    Addr,
    config::CFG_F_FLOW_EVENTS,
    ct::*,
    events::{
        EV_DROP, EV_NEW, EV_REJECT, HOOK_FROM_POD, HOOK_TO_POD, HOOK_UPLINK_IN, HOOK_UPLINK_OUT,
    },
    lb::*,
    metrics::*,
};

use weir_common::policy::{EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED};

use crate::{
    ct,
    events::{self, pack},
    fwd, icmp, lb,
    maps::{CONFIG, NODE_ADDRS, WORK, Work},
    metrics::count,
    nat::{self, End},
    parse::{self, FRAG_FIRST, FRAG_LATER, FRAG_NONE, TCP_SYN},
    policy, reject,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    FromPod,
    ToPod,
    UplinkIn,
    /// TC egress of an uplink: the node's own traffic to a Service frontend, when no
    /// socket hook translated it (socket LB off, or a process outside its cgroup).
    UplinkOut,
}

impl Hook {
    #[inline(always)]
    fn dir(self) -> u8 {
        match self {
            Hook::FromPod | Hook::UplinkOut => DIR_EGRESS,
            Hook::ToPod | Hook::UplinkIn => DIR_INGRESS,
        }
    }

    #[inline(always)]
    fn code(self) -> u8 {
        match self {
            Hook::FromPod => HOOK_FROM_POD,
            Hook::ToPod => HOOK_TO_POD,
            Hook::UplinkIn => HOOK_UPLINK_IN,
            Hook::UplinkOut => HOOK_UPLINK_OUT,
        }
    }
}

/// The outcome of a stage, packed into a u32 because BPF-to-BPF calls return in one
/// register: bits 0-7 kind, 8-15 reason.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Out(u32);

const OUT_OK: u32 = 0;
const OUT_DROP: u32 = 1;
const OUT_REJECT: u32 = 2;

impl Out {
    const OK: Out = Out(OUT_OK);
    #[inline(always)]
    fn drop(reason: u8) -> Out {
        Out(OUT_DROP | (reason as u32) << 8)
    }
    #[inline(always)]
    fn reject(reason: u8) -> Out {
        Out(OUT_REJECT | (reason as u32) << 8)
    }
    #[inline(always)]
    fn kind(self) -> u32 {
        self.0 & 0xff
    }
    #[inline(always)]
    fn reason(self) -> u8 {
        (self.0 >> 8) as u8
    }
}

/// `?` for stages returning `Out`: anything but OK returns early.
macro_rules! stage {
    ($e:expr) => {{
        let o: Out = $e;
        if o.kind() != OUT_OK {
            return o;
        }
    }};
}

#[inline(always)]
pub fn handle(ctx: &TcContext, hook: Hook) -> i32 {
    let Some(w) = WORK.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    let w = unsafe { &mut *w };
    match parse::parse(ctx, &mut w.pkt) {
        Ok(true) => {}
        Ok(false) => return TC_ACT_OK,
        Err(()) => {
            count(REASON_PARSE_ERROR, hook.dir(), ctx.len());
            return TC_ACT_OK;
        }
    }
    // Set only by a stage that translated the packet onto another route (fwd.rs).
    w.redirect = 0;
    policy::reset(w);
    if w.pkt.frag != FRAG_NONE {
        policy::set_frag_key(w, hook.dir());
    }
    w.ports_in = nat::ports_word(w.pkt.sport_be, w.pkt.dport_be);
    w.ports_out = w.ports_in;
    w.verdict_rule = 0;
    w.verdict_reason = 0;
    w.new_conn = 0;
    w.svc_port_id = 0;
    let o = if hook == Hook::ToPod {
        to_pod(ctx, w)
    } else if hook == Hook::UplinkOut {
        // The node's own packets: no pod policy applies; only frontends are translated
        // (and ICMP errors about translated flows translated back).
        w.iso = 0;
        if w.pkt.frag == FRAG_LATER {
            count(REASON_FORWARDED, DIR_EGRESS, w.pkt.len);
            Out::OK
        } else if !w.pkt.has_ports() {
            portless(ctx, w, false, DIR_EGRESS)
        } else {
            node_egress(ctx, w)
        }
    } else {
        let from_pod = hook == Hook::FromPod;
        // The source pod's isolation (one hash lookup; NetworkPolicy egress).
        if from_pod {
            policy::endpoint(w, true);
        } else {
            w.iso = 0;
        }
        if w.pkt.frag == FRAG_LATER {
            if w.iso != 0 {
                later_fragment(w, hook.dir())
            } else {
                count(REASON_FORWARDED, hook.dir(), w.pkt.len);
                Out::OK
            }
        } else if !w.pkt.has_ports() {
            portless(ctx, w, from_pod, hook.dir())
        } else {
            ingress(ctx, w, from_pod)
        }
    };
    // The rest of a fragmented datagram follows its first fragment's verdict (only
    // where policy applies: elsewhere later fragments pass as they always did).
    if w.pkt.frag == FRAG_FIRST && w.iso != 0 {
        policy::record_first_fragment(w, if o.kind() == OUT_OK { 0 } else { o.reason() });
    }
    // Events name the packet as it arrived: emitted before a reject rewrites it, from
    // the one place every verdict passes (the stages only return their outcome).
    match o.kind() {
        OUT_OK => {
            // SCTP's CRC32c is fixed here, once, rather than inside every stage: the
            // verifier walks a subprogram once per caller path, and the stages have many.
            if w.ports_out != w.ports_in
                && nat::sctp_fix_crc(ctx, &w.pkt, w.ports_in, w.ports_out).is_err()
            {
                count(REASON_NAT_FAILED, hook.dir(), w.pkt.len);
                events::emit(
                    ctx,
                    w,
                    pack(EV_DROP, REASON_NAT_FAILED, hook.dir(), hook.code()),
                );
                return TC_ACT_SHOT;
            }
            if w.new_conn != 0
                && let Some(cfg) = CONFIG.get_ptr(0)
                && unsafe { (*cfg).flags } & CFG_F_FLOW_EVENTS != 0
            {
                events::emit(
                    ctx,
                    w,
                    pack(EV_NEW, REASON_TRANSLATED, hook.dir(), hook.code()),
                );
            }
            if w.redirect != 0 {
                return fwd::redirect(ctx, w);
            }
            TC_ACT_OK
        }
        OUT_REJECT => {
            let reason = verdict_reason(w, o);
            count(reason, hook.dir(), w.pkt.len);
            events::emit(ctx, w, pack(EV_REJECT, reason, hook.dir(), hook.code()));
            reject::reject(ctx, &w.pkt)
        }
        _ => {
            let reason = verdict_reason(w, o);
            count(reason, hook.dir(), w.pkt.len);
            events::emit(ctx, w, pack(EV_DROP, reason, hook.dir(), hook.code()));
            if reason == REASON_NAT_FAILED {
                log_nat_failed(ctx, w);
            }
            TC_ACT_SHOT
        }
    }
}

/// Packets about to enter a pod: the destination pod's ingress policy. Service
/// translation and reverse translation happened at the first hook of this node that saw
/// the packet, so the tuple here is the connection's as the pod sees it.
#[inline(never)]
fn to_pod(ctx: &TcContext, w: &mut Work) -> Out {
    if policy::endpoint(w, false) == 0 {
        // Not a pod of this node, or isolated in neither direction: one lookup, nothing
        // tracked (its replies need no admission either).
        count(REASON_FORWARDED, DIR_INGRESS, w.pkt.len);
        return Out::OK;
    }
    if w.pkt.frag == FRAG_LATER {
        return later_fragment(w, DIR_INGRESS);
    }
    if !w.pkt.has_ports() {
        let ty: u8 = ctx.load(w.pkt.l4_off).unwrap_or(255);
        if icmp::is_error(&w.pkt, ty) && icmp::related(ctx, w) {
            count(REASON_FORWARDED, DIR_INGRESS, w.pkt.len);
            return Out::OK;
        }
    }
    stage!(flow_policy(w, DIR_INGRESS, true));
    count(REASON_FORWARDED, DIR_INGRESS, w.pkt.len);
    Out::OK
}

/// Packets without ports leaving a pod or entering the node: the source pod's egress
/// policy (ICMP errors pass with the connection they quote; other protocols are
/// connections of their own, looked up with port 0), then ICMP errors about translated
/// flows are translated back like replies.
#[inline(never)]
fn portless(ctx: &TcContext, w: &mut Work, from_pod: bool, dir: u8) -> Out {
    let ty: u8 = ctx.load(w.pkt.l4_off).unwrap_or(255);
    let err = icmp::is_error(&w.pkt, ty);
    // Policy sees the error as the pod sent it (quoting the flow as on the wire here).
    if from_pod && w.iso != 0 && !(err && icmp::related(ctx, w)) {
        stage!(flow_policy(w, DIR_EGRESS, true));
    }
    let reason = if err && icmp::reverse_error(ctx, w) == Ok(true) {
        REASON_REV_TRANSLATED
    } else {
        REASON_FORWARDED
    };
    count(reason, dir, w.pkt.len);
    Out::OK
}

/// A later fragment of a datagram from or to an isolated pod: its first fragment's
/// verdict; dropped when that is unknown (no decision exists for it).
#[inline(always)]
fn later_fragment(w: &mut Work, dir: u8) -> Out {
    let reason = policy::later_fragment(w).unwrap_or(REASON_FRAGMENT);
    if reason == 0 {
        count(REASON_FORWARDED, dir, w.pkt.len);
        return Out::OK;
    }
    policy::set_tuple(w);
    if reason == REASON_POLICY_DENIED || reason == REASON_POLICY_ISOLATED {
        w.event.kind = weir_common::policy::EVENT_POLICY_DROP;
        w.event.direction = dir;
        w.event.reason = reason;
    }
    Out::drop(reason)
}

/// Whether a packet that is a reply of the tracked flow `e` is admitted at this hook: the
/// flow was admitted into (`tc_from_pod`: the pod answers a connection it accepted) or
/// out of (`tc_to_pod`: the pod gets answers to a connection it opened) the local pod by
/// its policy for that direction, or the pod is not isolated for that direction.
/// Replies of an admitted connection pass whatever either side's policy says now.
#[inline(always)]
fn reply_admitted(w: &Work, e: *const CtEntry, hook_dir: u8) -> bool {
    let flags = unsafe { (*e).flags };
    let (need, iso) = if hook_dir == DIR_EGRESS {
        (CT_F_INGRESS_OK, EP_F_INGRESS_ISOLATED)
    } else {
        (CT_F_EGRESS_OK, EP_F_EGRESS_ISOLATED)
    };
    flags & need != 0 || w.iso & iso == 0
}

/// NetworkPolicy with conntrack for a packet that is not translated at this hook (its
/// tuple is the connection's), from or to a pod isolated in some direction (`w.iso`):
/// a packet of a connection already admitted in `dir` passes (looked up first: the
/// common case); a reply of a connection admitted the other way passes
/// (`check_reply`; `ingress` checks replies itself); anything else is a new connection
/// (a TCP segment without SYN included: it is no reply of anything admitted) and gets
/// `dir`'s decision, which is recorded in the FLOW entry (created here if none), so that
/// later packets and the replies pass without policy lookups.
#[inline(never)]
fn flow_policy(w: &mut Work, dir: u8, check_reply: bool) -> Out {
    let egress = dir == DIR_EGRESS;
    let now = ct::now_ns();
    let mine = if egress {
        CT_F_EGRESS_OK
    } else {
        CT_F_INGRESS_OK
    };
    // Entries another hook of this node keeps are not touched twice per packet.
    let keep_state = |flags: u16| egress || flags & CT_F_TO_POD != 0;
    ct::set_key(&mut w.key, &w.pkt, CT_KIND_FLOW);
    let fwd = match ct::lookup(&w.key) {
        Some(e) if !ct::is_stale(e, &w.pkt, now) => Some(e),
        _ => None,
    };
    if let Some(e) = fwd {
        let flags = unsafe { (*e).flags };
        if flags & mine != 0 {
            if keep_state(flags) {
                ct::touch(e, &w.pkt, false, now);
            }
            return Out::OK;
        }
    }
    if check_reply {
        ct::set_reply_key(&mut w.key, &w.pkt, CT_KIND_FLOW);
        if let Some(e) = ct::lookup(&w.key)
            && reply_admitted(w, e, dir)
        {
            if egress {
                // The first hook of this node to see the reply keeps the state.
                ct::touch(e, &w.pkt, true, now);
            }
            return Out::OK;
        }
        // A reply translated back to the frontend at an earlier hook: the client's SVC
        // entry (keyed by what the client sent) is the connection.
        if !egress && w.pkt.has_ports() {
            w.key.kind = CT_KIND_SVC;
            if let Some(e) = ct::lookup(&w.key)
                && reply_admitted(w, e, dir)
            {
                return Out::OK;
            }
        }
    }
    policy::set_tuple(w);
    if let Some(e) = fwd {
        // Tracked, but not yet admitted in this direction (another hook of this node
        // made the entry, or this pod became isolated since).
        let flags = unsafe { (*e).flags };
        if flags & CT_F_DNAT != 0 {
            // Translated at another hook of this node: name the frontend too.
            unsafe {
                w.event.orig_dst = (*e).nat_dst;
                w.event.orig_dport_be = (*e).nat_dport_be;
            }
        }
        let r = policy::decide(w, dir);
        if r != 0 {
            return Out::drop(r);
        }
        unsafe { (*e).flags |= mine };
        if keep_state(flags) {
            ct::touch(e, &w.pkt, false, now);
        }
        return Out::OK;
    }
    let r = policy::decide(w, dir);
    if r != 0 {
        return Out::drop(r);
    }
    ct::init_entry(&mut w.ct, &w.pkt, now);
    w.ct.flags |= mine | if egress { 0 } else { CT_F_TO_POD };
    ct::set_key(&mut w.key, &w.pkt, CT_KIND_FLOW);
    if ct::insert(&w.key, &w.ct).is_err() {
        return Out::drop(REASON_CT_FULL);
    }
    Out::OK
}

/// A translation the node cannot do (no masquerade address for the family, a rewrite
/// helper failing) is a configuration or kernel problem, not traffic: say so in the
/// agent's log (debug level; the ring write is skipped unless enabled at load).
#[inline(never)]
fn log_nat_failed(ctx: &TcContext, w: &Work) {
    aya_log_ebpf::debug!(
        ctx,
        "NAT failed, packet dropped: protocol {} destination port {}",
        w.pkt.proto,
        u16::from_be(w.pkt.dport_be)
    );
}

/// The reason a drop or reject is counted and reported under: the stage's, unless a
/// policy stage recorded its own in `Work::verdict_reason`.
#[inline(always)]
fn verdict_reason(w: &Work, o: Out) -> u8 {
    if w.verdict_reason != 0 {
        w.verdict_reason
    } else {
        o.reason()
    }
}

/// Packets entering the node's forwarding path (from a pod, or from an uplink).
#[inline(never)]
fn ingress(ctx: &TcContext, w: &mut Work, from_pod: bool) -> Out {
    let dir = if from_pod { DIR_EGRESS } else { DIR_INGRESS };

    // 1. A reply of a tracked flow? Reverse its translation. From a pod, only if the
    //    flow was admitted into that pod (else it is no reply: a new connection).
    ct::set_reply_key(&mut w.key, &w.pkt, CT_KIND_FLOW);
    if let Some(e) = ct::lookup(&w.key)
        && (!from_pod || reply_admitted(w, e, DIR_EGRESS))
    {
        ct::touch(e, &w.pkt, true, ct::now_ns());
        if unsafe { (*e).flags } & CT_F_DNAT != 0 {
            stage!(reverse(ctx, w, e));
            count(REASON_REV_TRANSLATED, dir, w.pkt.len);
        } else {
            count(REASON_FORWARDED, dir, w.pkt.len);
        }
        return Out::OK;
    }

    // 2. Addressed to a Service frontend? Translate (the source pod's egress policy is
    //    checked there, on the backend).
    if lb::lookup_frontend(w) {
        stage!(service(ctx, w, from_pod));
        count(REASON_TRANSLATED, dir, w.pkt.len);
        return Out::OK;
    }
    // A ClusterIP on a port its Service does not have: rejected, as kube-proxy's
    // nftables mode does for every cluster IP ("cluster-ips" set, final reject rule).
    if lb::is_cluster_ip(w) {
        return Out::reject(REASON_UNKNOWN_PORT_REJECT);
    }
    // An address of the service CIDR that no Service holds: dropped (nftables proxier,
    // "service-cidr" check).
    if let Some(cfg) = CONFIG.get_ptr(0)
        && unsafe { (*cfg).in_service_cidr(&w.pkt.dst) }
    {
        return Out::drop(REASON_UNALLOCATED_SERVICE_IP);
    }

    // 3. The source pod's egress policy.
    if from_pod && w.iso != 0 {
        stage!(flow_policy(w, DIR_EGRESS, false));
    }
    count(REASON_FORWARDED, dir, w.pkt.len);
    Out::OK
}

/// The node's own packets leaving through an uplink: only those from a node address to a
/// Service frontend are translated (forwarded and replies were handled at ingress). The
/// route was chosen for the frontend, not the backend, so the packet is forwarded anew.
#[inline(never)]
fn node_egress(ctx: &TcContext, w: &mut Work) -> Out {
    if unsafe { NODE_ADDRS.get(&w.pkt.src) }.is_none() || !lb::lookup_frontend(w) {
        return Out::OK;
    }
    stage!(service(ctx, w, false));
    count(REASON_TRANSLATED, DIR_EGRESS, w.pkt.len);
    w.redirect = 1;
    Out::OK
}

/// Rewrites a reply of a translated flow back: source := the frontend the client used;
/// destination := the client if it was masqueraded.
#[inline(never)]
fn reverse(ctx: &TcContext, w: &mut Work, e: *mut CtEntry) -> Out {
    let (flags, fe_addr, fe_port) = unsafe { ((*e).flags, (*e).nat_dst, (*e).nat_dport_be) };
    if nat::rewrite(ctx, &w.pkt, End::Src, &fe_addr, fe_port).is_err() {
        return Out::drop(REASON_NAT_FAILED);
    }
    let mut new_dport = w.pkt.dport_be;
    if flags & CT_F_SNAT != 0 {
        let (cl_addr, cl_port) = unsafe { ((*e).nat_src, (*e).nat_sport_be) };
        // The source already carries the frontend: the destination checksum update
        // must start from the packet as the first rewrite left it.
        let (d, dp) = (w.pkt.dst, w.pkt.dport_be);
        w.pkt.src = fe_addr;
        w.pkt.sport_be = fe_port;
        if nat::rewrite_from(ctx, &w.pkt, End::Dst, &d, dp, &cl_addr, cl_port).is_err() {
            return Out::drop(REASON_NAT_FAILED);
        }
        new_dport = cl_port;
    }
    w.ports_out = nat::ports_word(fe_port, new_dport);
    // The reply now comes from a node address (a NodePort, or the masquerade address of
    // a hairpin): forward it ourselves, the input path would drop it as a martian.
    if flags & CT_F_SNAT != 0 || unsafe { NODE_ADDRS.get(&fe_addr) }.is_some() {
        w.redirect = 1;
    }
    Out::OK
}

/// A packet to a Service frontend: keep the connection's translation or choose one,
/// then track and rewrite.
#[inline(never)]
fn service(ctx: &TcContext, w: &mut Work, from_pod: bool) -> Out {
    let now = ct::now_ns();
    w.svc_port_id = w.svc.svc_port_id;
    // loadBalancerSourceRanges: LoadBalancer-IP traffic from other sources is dropped
    // (the nftables proxier's firewall-ips check).
    if w.svc.flags & SVC_F_SRC_RANGES != 0 && !lb::source_allowed(w) {
        return Out::drop(REASON_SOURCE_RANGE_DENIED);
    }

    // The connection's translation: kept in the SVC entry so every packet of a
    // connection goes to the same backend; chosen anew if the entry is stale or its
    // backend is gone (a vanished backend is a miss, never a blackhole).
    ct::set_key(&mut w.key, &w.pkt, CT_KIND_SVC);
    w.snat = 0;
    w.nat_src = w.pkt.src;
    w.nat_sport_be = w.pkt.sport_be;
    let mut kept = false;
    // NetworkPolicy applies to pods' egress only (`tc_uplink_in`: ingress is checked at
    // the destination pod's veth); a connection whose SVC entry records the egress
    // verdict keeps it.
    let mut admitted = !from_pod;
    if let Some(e) = ct::lookup(&w.key)
        && !ct::is_stale(e, &w.pkt, now)
    {
        let id = unsafe { (*e).backend_id };
        // The backend is gone if its id no longer exists or now names another backend
        // (ids are reused once freed). A UDP flow also moves once its endpoint stops
        // serving (kube-proxy's UDP conntrack cleanup); TCP flows drain as long as the
        // endpoint exists (upstream never cleans TCP).
        let udp = w.pkt.proto == weir_common::proto::UDP;
        let live = lb::backend(id).filter(|be| unsafe {
            be.addr == (*e).nat_dst
                && be.port_be == (*e).nat_dport_be
                && (!udp || be.flags & BE_F_SERVING != 0)
        });
        if live.is_none()
            && w.pkt.proto == weir_common::proto::TCP
            && w.pkt.tcp_flags & TCP_SYN == 0
        {
            // The connection's backend was removed: reset the client at once instead of
            // sending its segments to a backend that never saw the handshake (or to
            // nowhere). A new SYN on the same tuple is simply re-balanced.
            return Out::reject(REASON_BACKEND_GONE_RESET);
        }
        if let Some(be) = live {
            ct::touch(e, &w.pkt, false, now);
            w.be_id = id;
            w.be = be;
            if unsafe { (*e).flags } & CT_F_SNAT != 0 {
                w.snat = 1;
                unsafe {
                    w.nat_src = (*e).nat_src;
                    w.nat_sport_be = (*e).nat_sport_be;
                }
            }
            kept = true;
            admitted |= unsafe { (*e).flags } & CT_F_EGRESS_OK != 0;
        }
    }
    if !kept {
        stage!(choose(w, from_pod));
    }
    // The source pod's egress policy, on the backend: rules name the backend pod and
    // its target port (docs/upstream-netpol.md §5.1).
    let ok = if from_pod { CT_F_EGRESS_OK } else { 0 };
    if !admitted {
        w.event.src = w.pkt.src;
        w.event.dst = w.be.addr;
        w.event.sport_be = w.pkt.sport_be;
        w.event.dport_be = w.be.port_be;
        w.event.proto = w.pkt.proto;
        w.event.orig_dst = w.pkt.dst;
        w.event.orig_dport_be = w.pkt.dport_be;
        let r = policy::decide(w, DIR_EGRESS);
        if r != 0 {
            return Out::drop(r);
        }
        if kept && let Some(e) = ct::lookup(&w.key) {
            unsafe { (*e).flags |= ok };
        }
    }
    if !kept {
        ct::init_entry(&mut w.ct, &w.pkt, now);
        w.ct.flags |= ok | CT_F_DNAT | if w.snat != 0 { CT_F_SNAT } else { 0 };
        w.ct.nat_src = w.nat_src;
        w.ct.nat_sport_be = w.nat_sport_be;
        w.ct.nat_dst = w.be.addr;
        w.ct.nat_dport_be = w.be.port_be;
        w.ct.backend_id = w.be_id;
        w.ct.rev_nat_id = w.svc.rev_nat_id;
        // w.key still holds the SVC key (choose does not touch it).
        if ct::insert(&w.key, &w.ct).is_err() {
            return Out::drop(REASON_CT_FULL);
        }
    }
    let o = track_and_rewrite(ctx, w, now, ok);
    if o.kind() == OUT_OK {
        events::count_service(w.svc.svc_port_id, w.pkt.len, !kept);
        w.new_conn = !kept as u8;
    }
    o
}

/// Tracks the flow as it will be on the wire (so replies find their way back: a reply
/// gets source := the frontend the client used and, if masqueraded, destination := the
/// client), then rewrites the packet. `ok` is the policy flag the connection earned at
/// this hook (`CT_F_EGRESS_OK` from a pod).
#[inline(never)]
fn track_and_rewrite(ctx: &TcContext, w: &mut Work, now: u64, ok: u16) -> Out {
    w.key = CtKey {
        src: w.nat_src,
        dst: w.be.addr,
        sport_be: w.nat_sport_be,
        dport_be: w.be.port_be,
        proto: w.pkt.proto,
        kind: CT_KIND_FLOW,
        pad: [0; 2],
    };
    let fresh = match ct::lookup(&w.key) {
        Some(e) if !ct::is_stale(e, &w.pkt, now) => {
            ct::touch(e, &w.pkt, false, now);
            unsafe { (*e).flags |= ok };
            false
        }
        _ => true,
    };
    if fresh {
        ct::init_entry(&mut w.ct, &w.pkt, now);
        w.ct.flags |= ok | CT_F_DNAT | if w.snat != 0 { CT_F_SNAT } else { 0 };
        w.ct.nat_src = w.pkt.src;
        w.ct.nat_sport_be = w.pkt.sport_be;
        w.ct.nat_dst = w.pkt.dst;
        w.ct.nat_dport_be = w.pkt.dport_be;
        w.ct.backend_id = w.be_id;
        w.ct.rev_nat_id = w.svc.rev_nat_id;
        if ct::insert(&w.key, &w.ct).is_err() {
            return Out::drop(REASON_CT_FULL);
        }
    }
    if nat::rewrite(ctx, &w.pkt, End::Dst, &w.be.addr, w.be.port_be).is_err() {
        return Out::drop(REASON_NAT_FAILED);
    }
    if w.snat != 0 {
        let (s, sp) = (w.pkt.src, w.pkt.sport_be);
        w.pkt.dst = w.be.addr;
        w.pkt.dport_be = w.be.port_be;
        if nat::rewrite_from(ctx, &w.pkt, End::Src, &s, sp, &w.nat_src, w.nat_sport_be).is_err() {
            return Out::drop(REASON_NAT_FAILED);
        }
    }
    w.ports_out = nat::ports_word(w.nat_sport_be, w.be.port_be);
    // Masqueraded: the source is now a node address; forward it ourselves (the input
    // path would drop it as a martian).
    if w.snat != 0 {
        w.redirect = 1;
    }
    Out::OK
}

/// Backend and masquerading for a new connection, into `w.be*`, `w.snat`, `w.nat_*`.
#[inline(never)]
fn choose(w: &mut Work, from_pod: bool) -> Out {
    let Some(cfg) = CONFIG.get_ptr(0) else {
        return Out::drop(REASON_UNSUPPORTED);
    };
    // kube-proxy's local detector: a source is "local" (a pod) if it came from a pod
    // interface of this node or lies in the cluster CIDR.
    let src_is_pod = from_pod || unsafe { (*cfg).in_cluster_cidr(&w.pkt.src) };
    let (scope, n) = lb::backend_set(&w.svc, src_is_pod);
    if n == 0 {
        // Upstream: no endpoints at all -> reject; endpoints exist but none is usable
        // under a Local policy -> drop.
        return if w.svc.flags & SVC_F_HAS_ENDPOINTS != 0 {
            Out::drop(REASON_NO_LOCAL_BACKEND_DROP)
        } else {
            Out::reject(REASON_NO_BACKEND_REJECT)
        };
    }
    if !lb::select(w, scope, n, cfg, ct::now_ns()) {
        return Out::drop(REASON_NO_LOCAL_BACKEND_DROP);
    }
    // Masquerade (mark-for-masquerade in the nftables proxier):
    // - external frontends under externalTrafficPolicy Cluster;
    // - ClusterIP traffic from outside the cluster CIDR (not from a pod);
    // - hairpin: a pod reaching itself through the Service (its own address as source
    //   would be a martian to it).
    let external = w.svc.flags & SVC_F_EXTERNAL != 0;
    let snat = (external && w.svc.flags & SVC_F_MASQ != 0)
        || (!external && !src_is_pod)
        || w.be.addr == w.pkt.src;
    if snat {
        let masq = unsafe {
            if w.pkt.v6 {
                (*cfg).masq_v6
            } else {
                (*cfg).masq_v4
            }
        };
        if masq == Addr::ZERO || masq == Addr::V4_ANY {
            return Out::drop(REASON_NAT_FAILED);
        }
        w.snat = 1;
        w.nat_src = masq;
        let (min, max) = unsafe { ((*cfg).snat_port_min, (*cfg).snat_port_max) };
        return snat_port(w, min, max);
    }
    Out::OK
}

/// A source port for a masqueraded flow: hashed from the connection so retries of the
/// same connection tend to get the same port, then probed (bounded for the verifier)
/// until the translated tuple is free in conntrack. The probe key is a local (this frame
/// is small) because `w.key` holds the SVC key the caller inserts afterwards.
#[inline(never)]
fn snat_port(w: &mut Work, min: u16, max: u16) -> Out {
    let (min, max) = (min as u32, max as u32);
    if min == 0 || max < min {
        return Out::drop(REASON_SNAT_PORTS_EXHAUSTED);
    }
    let range = max - min + 1;
    let start = lb::hash_tuple(&w.pkt).checked_rem(range).unwrap_or(0);
    let mut key = CtKey {
        src: w.nat_src,
        dst: w.be.addr,
        sport_be: 0,
        dport_be: w.be.port_be,
        proto: w.pkt.proto,
        kind: CT_KIND_FLOW,
        pad: [0; 2],
    };
    for i in 0..16u32 {
        let port = (min + (start + i * 7919).checked_rem(range).unwrap_or(0)) as u16;
        key.sport_be = port.to_be();
        if ct::lookup(&key).is_none() {
            w.nat_sport_be = port.to_be();
            return Out::OK;
        }
    }
    Out::drop(REASON_SNAT_PORTS_EXHAUSTED)
}
