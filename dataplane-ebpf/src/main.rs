//! weir's eBPF programs. Entry points stay thin; the logic lives in the modules:
//!
//! - `parse`: packet headers into a [`parse::Pkt`] (offsets and the 5-tuple, both families).
//! - `maps`: every map, by the names in `weir_common::maps`.
//! - `ct`: connection tracking lookups and updates.
//! - `lb`: frontend lookup and backend selection.
//! - `nat`: header rewrites with checksum updates.
//! - `metrics`: per-CPU counters.
//! - `policy`: NetworkPolicy lookups (identity, policy entries, counters, fragments).
//! - `events`: flow and drop events (rate-limited ring buffer), per-Service counters.
//! - `reject`: TCP RST / ICMP port unreachable generated in place.
//! - `fwd`: forwarding of translated packets whose source became a node address.
//! - `icmp`: ICMP errors about translated flows, translated back.
//! - `sock`: socket-level load balancing (cgroup sock_addr hooks).
//! - `flow`: the per-packet pipeline the TC entry points share.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod ct;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod fwd;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod metrics;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod sock;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{cgroup_sock_addr, classifier},
        programs::{SockAddrContext, TcContext},
    };

    use crate::{
        flow::{self, Hook},
        sock,
    };

    /// TC ingress on the host side of a pod's veth: packets leaving the pod.
    #[classifier]
    pub fn tc_from_pod(ctx: TcContext) -> i32 {
        flow::handle(&ctx, Hook::FromPod)
    }

    /// TC egress on the host side of a pod's veth: packets about to enter the pod.
    #[classifier]
    pub fn tc_to_pod(ctx: TcContext) -> i32 {
        flow::handle(&ctx, Hook::ToPod)
    }

    /// TC ingress on a node uplink: packets entering the node from the network.
    #[classifier]
    pub fn tc_uplink_in(ctx: TcContext) -> i32 {
        flow::handle(&ctx, Hook::UplinkIn)
    }

    /// TC egress on a node uplink: the node's own traffic to Service frontends that no
    /// socket hook translated.
    #[classifier]
    pub fn tc_uplink_out(ctx: TcContext) -> i32 {
        flow::handle(&ctx, Hook::UplinkOut)
    }

    #[cgroup_sock_addr(connect4)]
    pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
        sock::translate(&ctx, false, true)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
        sock::translate(&ctx, true, true)
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
        sock::translate(&ctx, false, false)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
        sock::translate(&ctx, true, false)
    }

    #[cgroup_sock_addr(recvmsg4)]
    pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, false)
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, true)
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, false)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, true)
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this is never called.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
