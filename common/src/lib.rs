//! # weir-common: the map ABI shared by the eBPF programs and the agent
//!
//! This crate is the single definition of every key and value that crosses the
//! kernel/user boundary. It is `#![no_std]` so the eBPF side can use it; the `user`
//! feature adds `aya::Pod` impls for the agent.
//!
//! Rules every type here follows (they are ABI, see ../shared/STYLE.md):
//! - `#[repr(C)]`, every padding byte spelled out as a `pad*` field, so that keys hash
//!   the same on both sides (implicit padding would be uninitialised stack bytes in BPF).
//! - No `bool`, `Option` or Rust enums in map values: integers with named constants.
//! - Byte order is in the field name: `*_be` fields hold network byte order as the packet
//!   carries it; everything else is host (little-endian) order.
//! - Sizes and field offsets are asserted at compile time at the bottom of each module.
//!
//! # Layout
//! - [`addr`]: [`Addr`], the 16-byte address used for IPv4 (v4-mapped) and IPv6 alike.
//! - [`lb`]: Service load balancing: `SERVICES`, `BACKENDS`, `REV_NAT`, `AFFINITY`, `MAGLEV`.
//! - [`ct`]: connection tracking (`CT`) and its flags, states and timeouts.
//! - [`metrics`]: datapath counters (`METRICS`) and the reason codes.
//! - [`events`]: flow and drop events (`EVENTS` ring buffer, rate limiting) and per-Service
//!   counters (`SVC_COUNTERS`).
//! - [`sock`]: the reverse map of socket-level load balancing.
//! - [`policy`]: NetworkPolicy: `IPCACHE`, `ENDPOINTS`, `POLICY`, per-rule counters, drop events.
//! - [`config`]: node-wide datapath settings (`CONFIG`) and node addresses (`NODE_ADDRS`).
//! - [`crc32c`]: incremental CRC32c for SCTP port translation.
//! - [`maps`]: map names and default capacities, the one list both sides use.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod addr;
pub mod config;
pub mod crc32c;
pub mod ct;
pub mod events;
pub mod lb;
pub mod maps;
pub mod metrics;
pub mod policy;
pub mod sock;

pub use addr::Addr;

/// IP protocol numbers used in keys (IANA).
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Implements `aya::Pod` for the listed ABI types when the `user` feature is on.
#[macro_export]
#[doc(hidden)]
macro_rules! impl_pod {
    ($($t:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: every listed type is #[repr(C)], made only of integers and arrays of
            // integers, with explicit padding fields, so any bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )+
    };
}

/// Compile-time size and offset checks.
#[macro_export]
#[doc(hidden)]
macro_rules! assert_layout {
    ($t:ty, size = $size:expr $(, $field:ident = $off:expr)* $(,)?) => {
        const _: () = {
            assert!(core::mem::size_of::<$t>() == $size);
            $( assert!(core::mem::offset_of!($t, $field) == $off); )*
        };
    };
}
