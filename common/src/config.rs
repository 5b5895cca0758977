//! Node-wide datapath settings: `CONFIG` (an array of one [`NodeConfig`]) and
//! `NODE_ADDRS` (hash of the node's own addresses, for NodePort frontends).

use crate::Addr;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct NodeConfig {
    /// Address used to masquerade (eTP=Cluster external traffic, hairpin), per family.
    pub masq_v4: Addr,
    pub masq_v6: Addr,
    /// `CFG_F_*`.
    pub flags: u32,
    /// Source ports for masqueraded flows: `[snat_port_min, snat_port_max]`, host order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Bumped by the agent on every successful sync (lets tests and `weir` see progress).
    pub generation: u64,
}
crate::assert_layout!(
    NodeConfig,
    size = 48,
    flags = 32,
    snat_port_min = 36,
    generation = 40
);

/// Socket-level load balancing is enabled (cgroup hooks translate east-west traffic).
pub const CFG_F_SOCKET_LB: u32 = 1 << 0;
/// Emit flow events for new connections (drops are always reported, rate-limited).
pub const CFG_F_FLOW_EVENTS: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct NodeAddrValue {
    pub flags: u32,
}
crate::assert_layout!(NodeAddrValue, size = 4);

crate::impl_pod!(NodeConfig, NodeAddrValue);
