//! Socket-level load balancing: the reverse map the cgroup socket hooks keep so that a
//! socket connected (or sending) to a Service frontend, which they pointed at a backend,
//! still sees the frontend as its peer (getpeername) and as the source of what it
//! receives (recvmsg on unconnected UDP).
//!
//! `SOCK_REV` (LRU hash): {socket cookie, backend address, backend port} -> the frontend.

use crate::Addr;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend: Addr,
    pub port_be: u16,
    pub pad: [u8; 6],
}
crate::assert_layout!(SockRevKey, size = 32, backend = 8, port_be = 24);

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct SockRevValue {
    pub frontend: Addr,
    pub port_be: u16,
    pub pad: u16,
    pub rev_nat_id: u32,
}
crate::assert_layout!(SockRevValue, size = 24, port_be = 16, rev_nat_id = 20);

crate::impl_pod!(SockRevKey, SockRevValue);
