//! The per-packet pipeline shared by the TC entry points.
//!
//! Every hook first asks conntrack whether the packet is a reply of a tracked flow
//! (reverse translation happens at the first hook on the node that sees the reply, so
//! before routing, which a masqueraded reply needs); then whether it is addressed to a
//! Service frontend (translate and track); otherwise it passes.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use weir_common::{ct::*, lb::*, metrics::*};

use crate::{
    ct, lb,
    metrics::count,
    nat::{self, End},
    parse::{self, FRAG_LATER, Pkt},
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    FromPod,
    ToPod,
    UplinkIn,
}

impl Hook {
    #[inline(always)]
    fn dir(self) -> u8 {
        match self {
            Hook::FromPod => DIR_EGRESS,
            Hook::ToPod | Hook::UplinkIn => DIR_INGRESS,
        }
    }
}

#[inline(always)]
pub fn handle(ctx: &aya_ebpf::programs::TcContext, hook: Hook) -> i32 {
    let pkt = match parse::parse(ctx) {
        Ok(Some(p)) => p,
        Ok(None) => return TC_ACT_OK,
        Err(()) => {
            count(REASON_PARSE_ERROR, hook.dir(), ctx.len());
            return TC_ACT_OK;
        }
    };
    if pkt.frag == FRAG_LATER || !pkt.has_ports() {
        count(REASON_FORWARDED, hook.dir(), pkt.len);
        return TC_ACT_OK;
    }
    if hook == Hook::ToPod {
        count(REASON_FORWARDED, hook.dir(), pkt.len);
        return TC_ACT_OK;
    }
    match ingress(ctx, &pkt, hook) {
        Ok(r) => r,
        Err(reason) => {
            count(reason, hook.dir(), pkt.len);
            TC_ACT_SHOT
        }
    }
}

/// Packets entering the node's forwarding path (from a pod, or from an uplink).
#[inline(always)]
fn ingress(ctx: &aya_ebpf::programs::TcContext, pkt: &Pkt, hook: Hook) -> Result<i32, u8> {
    let now = ct::now_ns();

    // 1. A reply of a tracked flow? Reverse its translation.
    let rkey = ct::reply_key_of(pkt, CT_KIND_FLOW);
    if let Some(e) = ct::lookup(&rkey) {
        ct::touch(e, pkt, true, now);
        // Read only the fields needed (the entry is too large to copy to the stack).
        let flags = unsafe { (*e).flags };
        if flags & CT_F_DNAT != 0 {
            let (fe_addr, fe_port) = unsafe { ((*e).nat_dst, (*e).nat_dport_be) };
            let mut p = *pkt;
            nat::rewrite(ctx, &p, End::Src, &fe_addr, fe_port).map_err(|_| REASON_NAT_FAILED)?;
            if flags & CT_F_SNAT != 0 {
                p.src = fe_addr;
                p.sport_be = fe_port;
                let (cl_addr, cl_port) = unsafe { ((*e).nat_src, (*e).nat_sport_be) };
                nat::rewrite(ctx, &p, End::Dst, &cl_addr, cl_port)
                    .map_err(|_| REASON_NAT_FAILED)?;
            }
            count(REASON_REV_TRANSLATED, hook.dir(), pkt.len);
            return Ok(TC_ACT_OK);
        }
        count(REASON_FORWARDED, hook.dir(), pkt.len);
        return Ok(TC_ACT_OK);
    }

    // 2. Addressed to a Service frontend? Translate.
    if let Some((fe, svc)) = lb::lookup_frontend(pkt) {
        return service(ctx, pkt, hook, &fe, &svc, now);
    }
    // A ClusterIP on a port its Service does not have: rejected, as kube-proxy's
    // nftables mode does (reject generation comes with the Services issue).
    if lb::is_cluster_ip(pkt) {
        return Err(REASON_UNKNOWN_PORT_REJECT);
    }

    count(REASON_FORWARDED, hook.dir(), pkt.len);
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn service(
    ctx: &aya_ebpf::programs::TcContext,
    pkt: &Pkt,
    hook: Hook,
    fe: &ServiceKey,
    svc: &ServiceValue,
    now: u64,
) -> Result<i32, u8> {
    // The connection's backend: kept in the SVC entry so every packet of a connection
    // goes to the same backend; chosen anew if the entry is stale or its backend is gone.
    let skey = ct::key_of(pkt, CT_KIND_SVC);
    let mut chosen: Option<(u32, Backend)> = None;
    if let Some(e) = ct::lookup(&skey)
        && !ct::is_stale(e, pkt, now)
    {
        let id = unsafe { (*e).backend_id };
        if let Some(be) = lb::backend(id)
            && unsafe { be.addr == (*e).nat_dst && be.port_be == (*e).nat_dport_be }
        {
            ct::touch(e, pkt, false, now);
            chosen = Some((id, be));
        }
    }
    let (be_id, be) = match chosen {
        Some(c) => c,
        None => {
            let (scope, n) = lb::backend_set(svc, hook == Hook::FromPod);
            let Some(c) = lb::select_random(fe, scope, n) else {
                // Upstream: no endpoints at all -> reject; endpoints exist but none is
                // usable here (Local policy) -> drop. Reject generation comes with the
                // Services issue; until then both drop, counted apart.
                return Err(if svc.flags & SVC_F_HAS_ENDPOINTS != 0 {
                    REASON_NO_LOCAL_BACKEND_DROP
                } else {
                    REASON_NO_BACKEND_REJECT
                });
            };
            let e = ct::scratch_entry(pkt, now).ok_or(REASON_CT_FULL)?;
            unsafe {
                (*e).flags |= CT_F_DNAT;
                (*e).nat_src = pkt.src;
                (*e).nat_sport_be = pkt.sport_be;
                (*e).nat_dst = c.1.addr;
                (*e).nat_dport_be = c.1.port_be;
                (*e).backend_id = c.0;
                (*e).rev_nat_id = svc.rev_nat_id;
            }
            ct::insert_ptr(&skey, e).map_err(|_| REASON_CT_FULL)?;
            c
        }
    };

    // The flow as it will be on the wire, tracked so that replies find their way back.
    let fkey = CtKey {
        src: pkt.src,
        dst: be.addr,
        sport_be: pkt.sport_be,
        dport_be: be.port_be,
        proto: pkt.proto,
        kind: CT_KIND_FLOW,
        pad: [0; 2],
    };
    let fresh = match ct::lookup(&fkey) {
        Some(e) if !ct::is_stale(e, pkt, now) => {
            ct::touch(e, pkt, false, now);
            false
        }
        _ => true,
    };
    if fresh {
        let e = ct::scratch_entry(pkt, now).ok_or(REASON_CT_FULL)?;
        unsafe {
            (*e).flags |= CT_F_DNAT;
            (*e).nat_src = pkt.src;
            (*e).nat_sport_be = pkt.sport_be;
            (*e).nat_dst = pkt.dst;
            (*e).nat_dport_be = pkt.dport_be;
            (*e).backend_id = be_id;
            (*e).rev_nat_id = svc.rev_nat_id;
        }
        ct::insert_ptr(&fkey, e).map_err(|_| REASON_CT_FULL)?;
    }

    nat::rewrite(ctx, pkt, End::Dst, &be.addr, be.port_be).map_err(|_| REASON_NAT_FAILED)?;
    count(REASON_TRANSLATED, hook.dir(), pkt.len);
    Ok(TC_ACT_OK)
}
