//! Socket-level load balancing (cgroup v2 sock_addr hooks).
//!
//! A socket of the node's cgroup that connects (TCP, connected UDP) or sends (unconnected
//! UDP) to a Service frontend is pointed straight at a backend, so east-west traffic needs
//! no per-packet NAT. `SOCK_REV` remembers, per socket, which frontend a backend stands
//! for, so getpeername and recvmsg show the frontend as the peer.
//!
//! What is left to the per-packet path, to keep upstream semantics exact:
//! - frontends with sessionAffinity (ClientIP needs the real source address) or Maglev
//!   (it hashes the 5-tuple, whose source port does not exist yet at connect);
//! - external frontends (NodePort, LB, externalIP) with externalTrafficPolicy Cluster
//!   when the socket is in a pod: kube-proxy masquerades that traffic, so it must go
//!   through the TC path which does. From the node's own namespace the source is the
//!   node address either way, and eTP Local frontends are short-circuited to the cluster
//!   set for pods and the node without masquerade: both are done here.
//! - a frontend with endpoints somewhere but none usable here (Local policies): left
//!   untranslated, the per-packet path drops it as upstream does.
//! A frontend with no endpoints at all fails the connect at once with ECONNREFUSED, the
//! errno kube-proxy's REJECT produces.
//!
//! These programs run in process context (preemptible), so they use the stack only,
//! never the per-CPU `WORK` slot of the TC programs.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use weir_common::{
    Addr,
    lb::*,
    proto,
    sock::{SockRevKey, SockRevValue},
};

use crate::maps::{BACKENDS, CONFIG, NODE_ADDRS, SERVICES, SOCK_REV};

/// Hook verdicts: 1 lets the call proceed; 0 fails it (with the errno set by
/// bpf_set_retval, EPERM otherwise).
pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

// Context fields are read and written one 32-bit word at a time with volatile accesses:
// the verifier only allows `*(ctx + constant)`, and a plain array copy lets LLVM form a
// modified context pointer first ("dereference of modified ctx ptr").
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

#[inline(always)]
fn dst(sa: *mut bpf_sock_addr, v6: bool) -> Addr {
    unsafe {
        if v6 {
            Addr::from_v6_raw([
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ])
        } else {
            Addr::from_v4_raw(read_volatile(addr_of!((*sa).user_ip4)))
        }
    }
}

#[inline(always)]
fn port(sa: *mut bpf_sock_addr) -> u16 {
    unsafe { read_volatile(addr_of!((*sa).user_port)) as u16 }
}

#[inline(always)]
fn set_dst(sa: *mut bpf_sock_addr, v6: bool, a: &Addr, port_be: u16) {
    unsafe {
        if v6 {
            // A v4 backend of a v4-mapped frontend stays v4-mapped: the socket is IPv6.
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), a.w[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), a.w[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), a.w[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), a.w[3]);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), a.v4_raw());
        }
        write_volatile(addr_of_mut!((*sa).user_port), port_be as u32);
    }
}

/// connect4/6 and sendmsg4/6: point the socket (or this datagram) at a backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, v6: bool, connect: bool) -> i32 {
    let sa = ctx.sock_addr;
    let p = unsafe { read_volatile(addr_of!((*sa).protocol)) } as u8;
    if p != proto::TCP && p != proto::UDP {
        return ALLOW;
    }
    let d = dst(sa, v6);
    let port_be = port(sa);
    let mut key = ServiceKey {
        addr: d,
        port_be,
        proto: p,
        scope: SCOPE_CLUSTER,
        slot: 0,
        pad: [0; 2],
    };
    let svc = match unsafe { SERVICES.get(&key) } {
        Some(v) => *v,
        None => {
            if unsafe { NODE_ADDRS.get(&d) }.is_none() {
                return ALLOW;
            }
            key.addr = if d.is_v4() {
                Addr::V4_ANY
            } else {
                Addr::V6_ANY
            };
            match unsafe { SERVICES.get(&key) } {
                Some(v) => *v,
                None => return ALLOW,
            }
        }
    };
    if svc.flags & (SVC_F_AFFINITY | SVC_F_MAGLEV | SVC_F_VIP_MARKER) != 0 {
        return ALLOW;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    let host = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.host_netns_cookie;
    let external = svc.flags & SVC_F_EXTERNAL != 0;
    if external && !host && svc.flags & SVC_F_MASQ != 0 {
        return ALLOW;
    }
    // ClusterIP: the internal traffic policy's set. External frontends seen from inside
    // the node: the cluster set (upstream's short-circuit of pod and node traffic).
    let (scope, n) = if !external && svc.flags & SVC_F_LOCAL != 0 {
        (SCOPE_LOCAL, svc.local_count)
    } else {
        (SCOPE_CLUSTER, svc.count)
    };
    if n == 0 {
        if svc.flags & SVC_F_HAS_ENDPOINTS == 0 {
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return DENY;
        }
        return ALLOW;
    }
    let r = unsafe { bpf_get_prandom_u32() };
    key.scope = scope;
    key.slot = r.checked_rem(n as u32).unwrap_or(0) as u16 + 1;
    let Some(slot) = (unsafe { SERVICES.get(&key) }) else {
        return ALLOW;
    };
    let Some(be) = (unsafe { BACKENDS.get(&slot.backend_id) }) else {
        return ALLOW;
    };
    let (be_addr, be_port) = (be.addr, be.port_be);
    let rk = SockRevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: be_addr,
        port_be: be_port,
        pad: [0; 6],
    };
    let rv = SockRevValue {
        frontend: d,
        port_be,
        pad: 0,
        rev_nat_id: svc.rev_nat_id,
    };
    let _ = SOCK_REV.insert(&rk, &rv, BPF_ANY as u64);
    set_dst(sa, v6, &be_addr, be_port);
    // A connect (TCP, connected UDP) is a new connection of the Service port. Datagrams
    // of unconnected UDP sockets (sendmsg) are not connections and are not counted.
    if connect {
        crate::events::count_service_connect(svc.svc_port_id);
    }
    ALLOW
}

/// getpeername4/6 and recvmsg4/6: show the frontend where the socket sees a backend it
/// was pointed at.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let rk = SockRevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: dst(sa, v6),
        port_be: port(sa),
        pad: [0; 6],
    };
    if let Some(rv) = unsafe { SOCK_REV.get(&rk) } {
        let (a, p) = (rv.frontend, rv.port_be);
        set_dst(sa, v6, &a, p);
    }
    ALLOW
}
