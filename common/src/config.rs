//! Node-wide datapath settings: `CONFIG` (an array of one [`NodeConfig`]) and
//! `NODE_ADDRS` (hash of the node's own addresses, for NodePort frontends).

use crate::Addr;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct NodeConfig {
    /// Address used to masquerade (eTP=Cluster external traffic, hairpin), per family.
    pub masq_v4: Addr,
    pub masq_v6: Addr,
    /// The cluster's pod CIDR per family (kube-proxy's `--cluster-cidr`, its
    /// "local detector"): sources inside it are pods, which decides masquerading of
    /// ClusterIP traffic and the eTP=Local short-circuit. Prefix length 0 = unset.
    pub cluster_v4: Addr,
    pub cluster_v6: Addr,
    pub cluster_v4_plen: u8,
    pub cluster_v6_plen: u8,
    /// The service CIDR per family (kube-apiserver's --service-cluster-ip-range): a
    /// destination inside it that is no Service's ClusterIP is dropped, as the nftables
    /// proxier does. Prefix length 0 = unset.
    pub service_v4_plen: u8,
    pub service_v6_plen: u8,
    pub service_v4: Addr,
    pub service_v6: Addr,
    /// `CFG_F_*`.
    pub flags: u32,
    /// Source ports for masqueraded flows: `[snat_port_min, snat_port_max]`, host order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Entries of every Maglev lookup table (a prime).
    pub maglev_table_size: u32,
    /// The input generation the agent last programmed (`weir lab` waits for it).
    pub generation: u64,
    /// Network namespace cookie of the node's host namespace (the agent's own): socket
    /// hooks treat sockets there as node-originated traffic (`bpf_get_netns_cookie`).
    pub host_netns_cookie: u64,
}
crate::assert_layout!(
    NodeConfig,
    size = 128,
    cluster_v4 = 32,
    cluster_v4_plen = 64,
    service_v4 = 68,
    flags = 100,
    snat_port_min = 104,
    maglev_table_size = 108,
    generation = 112
);

impl NodeConfig {
    /// Whether `a` lies in the cluster's pod CIDR of its family.
    #[inline(always)]
    pub fn in_cluster_cidr(&self, a: &Addr) -> bool {
        if a.is_v4() {
            self.cluster_v4_plen != 0
                && crate::addr::in_prefix(a, &self.cluster_v4, 96 + self.cluster_v4_plen as u32)
        } else {
            self.cluster_v6_plen != 0
                && crate::addr::in_prefix(a, &self.cluster_v6, self.cluster_v6_plen as u32)
        }
    }

    /// Whether `a` lies in the service CIDR of its family.
    #[inline(always)]
    pub fn in_service_cidr(&self, a: &Addr) -> bool {
        if a.is_v4() {
            self.service_v4_plen != 0
                && crate::addr::in_prefix(a, &self.service_v4, 96 + self.service_v4_plen as u32)
        } else {
            self.service_v6_plen != 0
                && crate::addr::in_prefix(a, &self.service_v6, self.service_v6_plen as u32)
        }
    }
}

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
