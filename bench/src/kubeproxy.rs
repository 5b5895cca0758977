//! The baselines: the rules kube-proxy would write for the same Services and
//! EndpointSlices, in its iptables mode (`iptables-restore` input) and its nftables mode
//! (`nft -f` input). Written from the upstream proxiers (kubernetes/kubernetes
//! `pkg/proxy/iptables/proxier.go#syncProxyRules`, `#writeServiceToEndpointRules`,
//! `pkg/proxy/nftables/proxier.go#setupNFTables`, `#syncProxyRules`,
//! `#writeServiceToEndpointRules`), restated, not copied. Input: the model weir's
//! directory source builds from the YAML (`weir::source::dir::to_cluster`).
//!
//! Covered (all the benchmark cluster uses, and the parts that cost per packet):
//! ClusterIP and NodePort frontends with `externalTrafficPolicy: Cluster` and
//! `internalTrafficPolicy: Cluster`, the local-traffic detector by pod CIDR
//! (`--cluster-cidr`), masquerade marks (0x4000) and `MASQUERADE --random-fully` /
//! `masquerade fully-random`, per-endpoint chains with the hairpin masquerade, random
//! endpoint choice (`statistic --mode random --probability 1/(n-i)`; `numgen random mod
//! n vmap`), Services without endpoints (iptables filter REJECT; nftables
//! `no-endpoint-services` to `reject-chain`), iptables' large-cluster mode (no comments
//! on endpoint rules above 1000 endpoints), KUBE-FORWARD, nftables' cluster-ips check.
//! Not generated (the benchmark has none): Local traffic policies, LoadBalancer and
//! externalIPs, session affinity, source ranges, health check node ports, IPv6.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use weir_core::model::{Cluster, Endpoint, Protocol, Service, ServicePort, ServiceType};

/// kube-proxy's default masquerade bit 14.
pub const MASQ_MARK: &str = "0x4000";
/// iptables' largeClusterEndpointsThreshold.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Settings kube-proxy would get from its flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// --cluster-cidr: the local-traffic detector.
    pub cluster_cidr: String,
    /// The service CIDR (nftables drops traffic to unallocated ClusterIPs).
    pub service_cidr: String,
    /// The node's primary IP (nftables' default NodePort address).
    pub node_ip: String,
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::TCP => "tcp",
        Protocol::UDP => "udp",
        Protocol::SCTP => "sctp",
    }
}

/// One Service port as both proxiers see it (`proxy.ServicePort` and its endpoints).
struct SvcPort<'a> {
    svc: &'a Service,
    port: &'a ServicePort,
    /// `ns/name:port` (ServicePortName.String()).
    name: String,
    cluster_ip: Option<IpAddr>,
    /// `ip:port`, in slice order.
    endpoints: Vec<(IpAddr, u16)>,
}

/// `proxy.CategorizeEndpoints` for Cluster policies: the ready endpoints, else the
/// serving-and-terminating ones (missing ready/serving mean true, terminating false).
fn usable(eps: &[(&Endpoint, u16)]) -> Vec<(IpAddr, u16)> {
    let ready: Vec<_> = eps
        .iter()
        .filter(|(e, _)| e.ready.unwrap_or(true) && !e.terminating.unwrap_or(false))
        .collect();
    let chosen: Vec<_> = if ready.is_empty() {
        eps.iter()
            .filter(|(e, _)| e.serving.unwrap_or(true) && e.terminating.unwrap_or(false))
            .collect()
    } else {
        ready
    };
    chosen
        .into_iter()
        .filter_map(|(e, p)| e.addresses.first().map(|a| (*a, *p)))
        .filter(|(a, _)| a.is_ipv4())
        .collect()
}

fn service_ports(c: &Cluster) -> Vec<SvcPort<'_>> {
    let mut by_svc: BTreeMap<(&str, &str), Vec<&weir_core::model::EndpointSlice>> = BTreeMap::new();
    for s in c.slices.values() {
        if let Some(svc) = &s.service {
            by_svc
                .entry((s.id.namespace.as_str(), svc.as_str()))
                .or_default()
                .push(s);
        }
    }
    let mut out = Vec::new();
    for svc in c.services.values() {
        if svc.headless || svc.type_ == ServiceType::ExternalName {
            continue;
        }
        let slices = by_svc
            .get(&(svc.id.namespace.as_str(), svc.id.name.as_str()))
            .cloned()
            .unwrap_or_default();
        for port in &svc.ports {
            let mut eps = Vec::new();
            for s in &slices {
                if let Some(sp) = s
                    .ports
                    .iter()
                    .find(|p| p.name == port.name && p.protocol == port.protocol)
                {
                    eps.extend(s.endpoints.iter().map(|e| (e, sp.port)));
                }
            }
            let name = if port.name.is_empty() {
                format!("{}/{}", svc.id.namespace, svc.id.name)
            } else {
                format!("{}/{}:{}", svc.id.namespace, svc.id.name, port.name)
            };
            out.push(SvcPort {
                svc,
                port,
                name,
                cluster_ip: svc.cluster_ips.iter().copied().find(IpAddr::is_ipv4),
                endpoints: usable(&eps),
            });
        }
    }
    out
}

fn sha256_base32(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    base32(d.as_ref())
}

/// RFC 4648 base32 (Go's base32.StdEncoding), enough characters for chain names.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// iptables chain name: prefix + base32(sha256(name + protocol [+ endpoint]))[:16]
/// (`portProtoHash`, `servicePortEndpointChainName`).
fn ipt_chain(prefix: &str, svc_port_name: &str, protocol: &str, endpoint: &str) -> String {
    let h = sha256_base32(&format!("{svc_port_name}{protocol}{endpoint}"));
    format!("{prefix}{}", &h[..16])
}

/// `computeProbability`: 1/n with 10 decimals.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Counts of what a generated ruleset holds (for the results).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RuleStats {
    pub service_ports: usize,
    pub endpoints: usize,
    pub chains: usize,
    pub rules: usize,
    pub bytes: usize,
}

/// The jump rules kube-proxy installs with single iptables commands
/// (`iptablesJumpChains`), as an `iptables-restore --noflush` input.
pub fn iptables_jumps() -> String {
    let mut s = String::new();
    s.push_str("*filter\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n");
    for (chain, from, comment, extra) in [
        (
            "KUBE-EXTERNAL-SERVICES",
            "INPUT",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "KUBE-EXTERNAL-SERVICES",
            "FORWARD",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "KUBE-NODEPORTS",
            "INPUT",
            "kubernetes health check service ports",
            "",
        ),
        (
            "KUBE-SERVICES",
            "FORWARD",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW ",
        ),
        ("KUBE-FORWARD", "FORWARD", "kubernetes forwarding rules", ""),
        (
            "KUBE-PROXY-FIREWALL",
            "INPUT",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "KUBE-PROXY-FIREWALL",
            "OUTPUT",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "KUBE-PROXY-FIREWALL",
            "FORWARD",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW ",
        ),
    ] {
        let _ = writeln!(
            s,
            "-I {from} {extra}-m comment --comment \"{comment}\" -j {chain}"
        );
    }
    s.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    for (chain, from, comment) in [
        ("KUBE-SERVICES", "OUTPUT", "kubernetes service portals"),
        ("KUBE-SERVICES", "PREROUTING", "kubernetes service portals"),
        (
            "KUBE-POSTROUTING",
            "POSTROUTING",
            "kubernetes postrouting rules",
        ),
    ] {
        let _ = writeln!(s, "-I {from} -m comment --comment \"{comment}\" -j {chain}");
    }
    s.push_str("COMMIT\n");
    s
}

/// What `syncProxyRules` hands to `iptables-restore --noflush` on a full sync.
pub fn iptables_rules(c: &Cluster, st: &Settings) -> (String, RuleStats) {
    let ports = service_ports(c);
    let total_endpoints: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let mut stats = RuleStats {
        service_ports: ports.len(),
        endpoints: total_endpoints,
        ..Default::default()
    };
    let mut filter_chains = String::new();
    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::with_capacity(total_endpoints * 200);
    for ch in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(filter_chains, ":{ch} - [0:0]");
    }
    for ch in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(nat_chains, ":{ch} - [0:0]");
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"
    );
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let comment = |s: &str| -> String {
        if large {
            String::new()
        } else {
            format!("-m comment --comment \"{s}\" ")
        }
    };
    for sp in &ports {
        let Some(vip) = sp.cluster_ip else { continue };
        let p = proto(sp.port.protocol);
        let name = &sp.name;
        let svc_chain = ipt_chain("KUBE-SVC-", name, p, "");
        let ext_chain = ipt_chain("KUBE-EXT-", name, p, "");
        let port = sp.port.port;
        let has_endpoints = !sp.endpoints.is_empty();
        let node_port = sp.port.node_port;
        let external = node_port != 0
            && matches!(
                sp.svc.type_,
                ServiceType::NodePort | ServiceType::LoadBalancer
            );
        if has_endpoints {
            let _ = writeln!(
                nat_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {vip} --dport {port} -j {svc_chain}"
            );
        } else {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {p} -p {p} -d {vip} --dport {port} -j REJECT"
            );
        }
        if external {
            if has_endpoints {
                let _ = writeln!(
                    nat_rules,
                    "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {node_port} -j {ext_chain}"
                );
            } else {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {node_port} -j REJECT"
                );
            }
        }
        if !has_endpoints {
            continue;
        }
        // Internal traffic: masquerade what does not come from a pod (local detector).
        let _ = writeln!(nat_chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            nat_rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {vip} --dport {port} ! -s {} -j KUBE-MARK-MASQ",
            st.cluster_cidr
        );
        // External traffic (eTP Cluster): always masquerade, then the Cluster chain.
        if external {
            let _ = writeln!(nat_chains, ":{ext_chain} - [0:0]");
            let _ = writeln!(
                nat_rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(nat_rules, "-A {ext_chain} -j {svc_chain}");
        }
        // writeServiceToEndpointRules: probability 1/(n-i) for all but the last.
        let n = sp.endpoints.len();
        let seps: Vec<String> = sp
            .endpoints
            .iter()
            .map(|(ip, port)| ipt_chain("KUBE-SEP-", name, p, &format!("{ip}:{port}")))
            .collect();
        for (i, ((ip, eport), sep)) in sp.endpoints.iter().zip(&seps).enumerate() {
            let c = comment(&format!("{name} -> {ip}:{eport}"));
            if i + 1 < n {
                let _ = writeln!(
                    nat_rules,
                    "-A {svc_chain} {c}-m statistic --mode random --probability {} -j {sep}",
                    probability(n - i)
                );
            } else {
                let _ = writeln!(nat_rules, "-A {svc_chain} {c}-j {sep}");
            }
        }
        for ((ip, eport), sep) in sp.endpoints.iter().zip(&seps) {
            let c = comment(name);
            let _ = writeln!(nat_chains, ":{sep} - [0:0]");
            let _ = writeln!(nat_rules, "-A {sep} {c}-s {ip} -j KUBE-MARK-MASQ");
            let _ = writeln!(
                nat_rules,
                "-A {sep} {c}-m {p} -p {p} -j DNAT --to-destination {ip}:{eport}"
            );
        }
    }
    // The default nodePortAddresses match every local address: the NodePort chain is the
    // last rule of KUBE-SERVICES (localhost NodePorts stay enabled, as by default).
    let _ = writeln!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    let mut out = String::with_capacity(nat_rules.len() + nat_chains.len() + 4096);
    out.push_str("*filter\n");
    out.push_str(&filter_chains);
    out.push_str(&filter_rules);
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&nat_chains);
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n");
    stats.chains = filter_chains.lines().count() + nat_chains.lines().count();
    stats.rules = filter_rules.lines().count() + nat_rules.lines().count();
    stats.bytes = out.len();
    (out, stats)
}

/// nftables chain name base: base32(sha256(name))[:8] + "-" + name (`hashAndTruncate`;
/// the bench's names never need truncating).
fn nft_base(name: &str) -> String {
    format!("{}-{name}", &sha256_base32(name)[..8])
}

/// What `syncProxyRules` (with `setupNFTables`) hands to `nft -f` on a full sync, in
/// the transaction form knftables writes (one command per line).
pub fn nft_rules(c: &Cluster, st: &Settings) -> (String, RuleStats) {
    let ports = service_ports(c);
    let total_endpoints: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let mut stats = RuleStats {
        service_ports: ports.len(),
        endpoints: total_endpoints,
        ..Default::default()
    };
    let t = "ip kube-proxy";
    let mut s = String::with_capacity(total_endpoints * 300 + 8192);
    let mut chains = 0usize;
    let mut rules = 0usize;
    let mut chain = |s: &mut String, name: &str, extra: &str| {
        chains += 1;
        if extra.is_empty() {
            let _ = writeln!(s, "add chain {t} {name}");
        } else {
            let _ = writeln!(s, "add chain {t} {name} {{ {extra} }}");
        }
    };
    let _ = writeln!(s, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    for (name, ty, hook, prio) in [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("filter-output-post-dnat", "filter", "output", "-90"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ] {
        chain(
            &mut s,
            name,
            &format!("type {ty} hook {hook} priority {prio} ;"),
        );
    }
    for name in [
        "nodeport-endpoints-check",
        "service-endpoints-check",
        "firewall-check",
        "services",
        "masquerading",
        "cluster-ips-check",
        "mark-for-masquerade",
        "reject-chain",
    ] {
        chain(&mut s, name, "");
    }
    let mut rule = |s: &mut String, chain: &str, r: &str| {
        rules += 1;
        let _ = writeln!(s, "add rule {t} {chain} {r}");
    };
    for (dst, src) in [
        ("nodeport-endpoints-check", "filter-input"),
        ("service-endpoints-check", "filter-input"),
        ("service-endpoints-check", "filter-forward"),
        ("service-endpoints-check", "filter-output"),
        ("firewall-check", "filter-prerouting"),
        ("firewall-check", "filter-output"),
    ] {
        rule(&mut s, src, &format!("ct state new jump {dst}"));
    }
    rule(&mut s, "nat-output", "jump services");
    rule(&mut s, "nat-prerouting", "jump services");
    rule(&mut s, "nat-postrouting", "jump masquerading");
    rule(
        &mut s,
        "filter-forward",
        "ct state new jump cluster-ips-check",
    );
    rule(
        &mut s,
        "filter-output-post-dnat",
        "ct state new jump cluster-ips-check",
    );
    rule(
        &mut s,
        "mark-for-masquerade",
        &format!("mark set mark or {MASQ_MARK}"),
    );
    rule(
        &mut s,
        "masquerading",
        &format!("mark and {MASQ_MARK} == 0 return"),
    );
    rule(
        &mut s,
        "masquerading",
        &format!("mark set mark xor {MASQ_MARK}"),
    );
    rule(&mut s, "masquerading", "masquerade fully-random");
    let _ = writeln!(
        s,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    rule(
        &mut s,
        "cluster-ips-check",
        "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
    );
    rule(
        &mut s,
        "cluster-ips-check",
        &format!(
            "ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            st.service_cidr
        ),
    );
    // Default --nodeport-addresses in nftables mode: the node's primary IP.
    let _ = writeln!(
        s,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(s, "add element {t} nodeport-ips {{ {} }}", st.node_ip);
    let _ = writeln!(
        s,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        s,
        "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    rule(&mut s, "reject-chain", "reject");
    rule(
        &mut s,
        "service-endpoints-check",
        "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    );
    rule(
        &mut s,
        "nodeport-endpoints-check",
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
    );
    let _ = writeln!(
        s,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    rule(
        &mut s,
        "firewall-check",
        "ip daddr . meta l4proto . th dport vmap @firewall-ips",
    );
    let _ = writeln!(
        s,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        s,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    rule(
        &mut s,
        "services",
        "ip daddr . meta l4proto . th dport vmap @service-ips",
    );
    rule(
        &mut s,
        "services",
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
    );

    for sp in &ports {
        let Some(vip) = sp.cluster_ip else { continue };
        let p = proto(sp.port.protocol);
        let base = nft_base(&format!(
            "{}/{}/{p}/{}",
            sp.svc.id.namespace, sp.svc.id.name, sp.port.name
        ));
        let svc_chain = format!("service-{base}");
        let ext_chain = format!("external-{base}");
        let port = sp.port.port;
        let node_port = sp.port.node_port;
        let external = node_port != 0
            && matches!(
                sp.svc.type_,
                ServiceType::NodePort | ServiceType::LoadBalancer
            );
        let _ = writeln!(s, "add element {t} cluster-ips {{ {vip} }}");
        if sp.endpoints.is_empty() {
            let _ = writeln!(
                s,
                "add element {t} no-endpoint-services {{ {vip} . {p} . {port} comment \"{}\" : goto reject-chain }}",
                sp.name
            );
            if external {
                let _ = writeln!(
                    s,
                    "add element {t} no-endpoint-nodeports {{ {p} . {node_port} comment \"{}\" : goto reject-chain }}",
                    sp.name
                );
            }
            continue;
        }
        let eps: Vec<String> = sp
            .endpoints
            .iter()
            .map(|(ip, eport)| {
                format!(
                    "endpoint-{}",
                    nft_base(&format!(
                        "{}/{}/{p}/{}__{ip}/{eport}",
                        sp.svc.id.namespace, sp.svc.id.name, sp.port.name
                    ))
                )
            })
            .collect();
        for e in &eps {
            chain(&mut s, e, "");
        }
        chain(&mut s, &svc_chain, "");
        if external {
            chain(&mut s, &ext_chain, "");
        }
        let _ = writeln!(
            s,
            "add element {t} service-ips {{ {vip} . {p} . {port} : goto {svc_chain} }}"
        );
        if external {
            let _ = writeln!(
                s,
                "add element {t} service-nodeports {{ {p} . {node_port} : goto {ext_chain} }}"
            );
        }
        rule(
            &mut s,
            &svc_chain,
            &format!(
                "ip daddr {vip} {p} dport {port} ip saddr != {} jump mark-for-masquerade",
                st.cluster_cidr
            ),
        );
        if external {
            rule(&mut s, &ext_chain, "jump mark-for-masquerade");
            rule(&mut s, &ext_chain, &format!("goto {svc_chain}"));
        }
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i} : goto {e}"))
            .collect();
        rule(
            &mut s,
            &svc_chain,
            &format!(
                "numgen random mod {} vmap {{ {} }}",
                eps.len(),
                vmap.join(" , ")
            ),
        );
        for ((ip, eport), e) in sp.endpoints.iter().zip(&eps) {
            rule(
                &mut s,
                e,
                &format!("ip saddr {ip} jump mark-for-masquerade"),
            );
            rule(&mut s, e, &format!("meta l4proto {p} dnat to {ip}:{eport}"));
        }
    }
    stats.chains = chains;
    stats.rules = rules;
    stats.bytes = s.len();
    (s, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: usize) -> Cluster {
        let (objs, _) = weir::source::yaml::parse_documents(&crate::cluster::services_yaml(n), "t");
        weir::source::dir::to_cluster(&objs).0
    }

    fn settings() -> Settings {
        Settings {
            cluster_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.96.0.0/16".into(),
            node_ip: "192.168.100.2".into(),
        }
    }

    #[test]
    fn base32_matches_go_std_encoding() {
        // Go: base32.StdEncoding.EncodeToString([]byte("foobar")) == "MZXW6YTBOI======".
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn chain_names_follow_the_upstream_hashing() {
        // Upstream proxier_test.go (TestOverallIPTablesRules): ns1/svc1:p80 over tcp is
        // KUBE-SVC-XPGD46QRK7WJZT7O, its endpoint 10.180.0.1:80 KUBE-SEP-SXIVWICOYRO3J4NJ.
        assert_eq!(
            ipt_chain("KUBE-SVC-", "ns1/svc1:p80", "tcp", ""),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            ipt_chain("KUBE-SEP-", "ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        // nftables proxier_test.go: service-ULMVA6XW-ns1/svc1/tcp/p80 and
        // endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80.
        assert_eq!(nft_base("ns1/svc1/tcp/p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            nft_base("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn iptables_rules_have_the_upstream_shape() {
        let (r, st) = iptables_rules(&cluster(3), &settings());
        // 4 Services (3 + iperf): 3x10 + 1 endpoints; one NodePort.
        assert_eq!(st.service_ports, 4);
        assert_eq!(st.endpoints, 31);
        assert_eq!(r.matches("-j DNAT").count(), 31);
        assert_eq!(r.matches("--probability 0.1000000000").count(), 3);
        assert_eq!(r.matches("--probability 0.5000000000").count(), 3);
        assert_eq!(r.matches("-A KUBE-NODEPORTS").count(), 1);
        assert!(r.contains("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(r.trim_end().ends_with("COMMIT"));
        // The NodePort jump is the last rule of KUBE-SERVICES.
        let last = r
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last.contains("KUBE-NODEPORTS"), "{last}");
    }

    #[test]
    fn nft_rules_have_the_upstream_shape() {
        let (r, st) = nft_rules(&cluster(3), &settings());
        assert_eq!(st.endpoints, 31);
        assert_eq!(r.matches("numgen random mod 10 vmap").count(), 3);
        assert_eq!(r.matches(" dnat to ").count(), 31);
        assert_eq!(
            r.matches("add element ip kube-proxy service-nodeports")
                .count(),
            1
        );
    }

    #[test]
    fn services_without_endpoints_are_rejected() {
        let mut c = cluster(1);
        for s in c.slices.values_mut() {
            s.endpoints.clear();
        }
        let (r, _) = iptables_rules(&c, &settings());
        assert!(
            r.contains("has no endpoints\" -m tcp -p tcp -d 10.96.1.0 --dport 80 -j REJECT"),
            "{r}"
        );
        let (r, _) = nft_rules(&c, &settings());
        assert!(
            r.contains("no-endpoint-services { 10.96.1.0 . tcp . 80"),
            "{r}"
        );
    }
}
