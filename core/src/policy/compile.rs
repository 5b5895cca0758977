//! Cluster -> [`PolicyImage`] for one node: identities, policy keys, policy entries.
//!
//! # Identities (remote addresses)
//! The peers that matter on this node are those of the policies that select at least one
//! of its pods for the rule's direction (a policy that selects no local pod has no effect
//! here). Each peer is canonicalised ([`PeerDef`]: selectors normalised, CIDRs masked), so
//! the same peer written in two policies is one peer. The *signature* of an address is
//! the set of peers it matches plus, for the named ports used in egress rules, the numbers
//! its pod declares for them (an egress rule's named port resolves on the destination
//! pod). Every pod address gets the signature of its pod and address; the address space
//! outside pods is cut into regions by the ipBlock CIDRs and excepts: the addresses whose
//! longest covering prefix (among those CIDRs, excepts and the two family roots) is `p`
//! all match exactly the ipBlocks whose CIDR contains `p` and none of whose excepts
//! contains `p` (prefixes covering one address form a chain), so each prefix is one
//! region with one signature. Addresses with equal signatures form one identity: no rule
//! can tell them apart. A pod whose identity equals its region's needs no `IPCACHE` entry.
//!
//! # Policy keys (local endpoints)
//! A pod's key for a direction is shared by the pods selected, in that direction, by the
//! same policies with the same rules (and, for ingress, resolving those rules' named ports
//! to the same numbers on themselves). Pods selected by no policy for a direction are not
//! isolated and get no key.
//!
//! # Entries
//! For each key and each rule of its policies: every identity whose signature contains
//! one of the rule's peers (or [`ID_ANY`] when the rule names no peer), times the rule's
//! ports: any protocol (no ports), a protocol (no port), a range cut into aligned LPM
//! blocks, or a named port resolved per key (ingress) or per identity (egress). Then the
//! key's catch-all at `{key, ID_ANY, dir}/72`, a deny naming the reason and the policy
//! counted against, unless a rule already allows everything there. Entries covered by a
//! shorter allow of the same identity or of [`ID_ANY`] are dropped (the lookup would
//! allow anyway).
//!
//! # Numbers
//! Identity numbers stay with their members: a class keeps its number while its
//! signature is unchanged; a class whose signature changed inherits the number most of
//! its members had (so adding a policy does not renumber the cluster); new classes get
//! the number their signature hashes to (FNV-1a), probing past numbers in use. Policy
//! keys are numbered by a hash of their content, never reusing a number the maps still
//! hold for other content: a changed policy means a new key whose entries are complete
//! before endpoints switch to it (make-before-break, see [`super::plan`]). Rule ids are
//! dense (they index the per-CPU counter array) and kept per (policy, direction, rule
//! index). All three are seeded from the pinned maps when the agent restarts.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use ipnet::IpNet;
use weir_common::{
    Addr,
    metrics::{REASON_POLICY_DENIED, REASON_POLICY_ISOLATED},
    policy::*,
};

use super::{
    eval::Direction,
    ids::{DenseIds, Fnv, port_prefixes, preferred, probe},
    image::{
        LpmData, PolicyImage, addr_prefix, lpm_get, lpm_get_among, prefix_lengths, show_addr_prefix,
    },
};
use crate::{image::Lpm, model::*};

/// Options from the node's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyOptions {
    /// Rule ids must stay below this (capacity of `POLICY_RULES` and `POLICY_COUNTERS`).
    pub max_rules: u32,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            max_rules: weir_common::maps::DEFAULT_POLICY_RULES_MAX,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "NetworkPolicy {policy}: no free rule id (at most {max} rules on a node; raise the \
         POLICY_RULES and POLICY_COUNTERS map sizes)"
    )]
    RulesExhausted { policy: ObjRef, max: u32 },
    #[error("no free {what} number")]
    IdsExhausted { what: &'static str },
}

impl PolicyError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            PolicyError::RulesExhausted { .. } => "policy_rules_exhausted",
            PolicyError::IdsExhausted { .. } => "policy_ids_exhausted",
        }
    }
}

/// How a selector peer picks namespaces.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NsMatch {
    /// No namespaceSelector: the policy's own namespace.
    Named(String),
    Selector(LabelSelector),
}

/// A peer in canonical form, comparable across policies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerDef {
    Pods {
        ns: NsMatch,
        /// None: every pod (an empty podSelector is the same).
        pod: Option<LabelSelector>,
    },
    Block(IpBlock),
}

/// A selector with its expressions and their values sorted and deduplicated (ANDed
/// clauses and value sets have no order).
pub fn canonical_selector(s: &LabelSelector) -> LabelSelector {
    let mut exprs: Vec<LabelSelectorRequirement> = s
        .match_expressions
        .iter()
        .map(|e| {
            let mut values = e.values.clone();
            values.sort();
            values.dedup();
            LabelSelectorRequirement {
                key: e.key.clone(),
                operator: e.operator,
                values,
            }
        })
        .collect();
    exprs.sort();
    exprs.dedup();
    LabelSelector {
        match_labels: s.match_labels.clone(),
        match_expressions: exprs,
    }
}

/// A network with host bits cleared; an IPv6 network inside `::ffff:0:0/96` is the IPv4
/// network it maps (the datapath stores IPv4 that way).
pub fn canonical_net(n: &IpNet) -> IpNet {
    let n = n.trunc();
    if let IpNet::V6(v6) = n
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        return IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("<= 32"));
    }
    n
}

fn canonical_block(b: &IpBlock) -> IpBlock {
    let mut except: Vec<IpNet> = b.except.iter().map(canonical_net).collect();
    except.sort();
    except.dedup();
    IpBlock {
        cidr: canonical_net(&b.cidr),
        except,
    }
}

fn hash_selector(h: &mut Fnv, s: &LabelSelector) {
    h.u32(s.match_labels.len() as u32);
    for (k, v) in &s.match_labels {
        h.str(k).str(v);
    }
    h.u32(s.match_expressions.len() as u32);
    for e in &s.match_expressions {
        h.str(&e.key)
            .u8(e.operator as u8)
            .u32(e.values.len() as u32);
        for v in &e.values {
            h.str(v);
        }
    }
}

fn hash_net(h: &mut Fnv, n: &IpNet) {
    match n {
        IpNet::V4(n) => h.u8(4).bytes(&n.network().octets()),
        IpNet::V6(n) => h.u8(6).bytes(&n.network().octets()),
    };
    h.u8(n.prefix_len());
}

fn show_selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in &s.match_expressions {
        parts.push(match e.operator {
            SelectorOp::In => format!("{} in ({})", e.key, e.values.join(",")),
            SelectorOp::NotIn => format!("{} notin ({})", e.key, e.values.join(",")),
            SelectorOp::Exists => e.key.clone(),
            SelectorOp::DoesNotExist => format!("!{}", e.key),
        });
    }
    if parts.is_empty() {
        "{}".into()
    } else {
        parts.join(", ")
    }
}

impl PeerDef {
    pub fn of(policy: &NetworkPolicy, peer: &PolicyPeer) -> PeerDef {
        match peer {
            PolicyPeer::IpBlock(b) => PeerDef::Block(canonical_block(b)),
            PolicyPeer::Selector { namespace, pod } => PeerDef::Pods {
                ns: match namespace {
                    None => NsMatch::Named(policy.id.namespace.clone()),
                    Some(s) => NsMatch::Selector(canonical_selector(s)),
                },
                pod: pod
                    .as_ref()
                    .filter(|s| !s.is_empty())
                    .map(canonical_selector),
            },
        }
    }

    fn hash_into(&self, h: &mut Fnv) {
        match self {
            PeerDef::Pods { ns, pod } => {
                h.u8(1);
                match ns {
                    NsMatch::Named(n) => {
                        h.u8(1).str(n);
                    }
                    NsMatch::Selector(s) => {
                        h.u8(2);
                        hash_selector(h, s);
                    }
                }
                match pod {
                    None => {
                        h.u8(0);
                    }
                    Some(s) => {
                        h.u8(1);
                        hash_selector(h, s);
                    }
                }
            }
            PeerDef::Block(b) => {
                h.u8(2);
                hash_net(h, &b.cidr);
                h.u32(b.except.len() as u32);
                for e in &b.except {
                    hash_net(h, e);
                }
            }
        }
    }

    fn hash(&self) -> u64 {
        let mut h = Fnv::default();
        self.hash_into(&mut h);
        h.finish()
    }

    /// Whether this selector peer matches a pod with these namespace labels and labels.
    fn matches_pod(&self, pod: &Pod, ns_labels: &Labels) -> bool {
        match self {
            PeerDef::Block(_) => false,
            PeerDef::Pods { ns, pod: sel } => {
                (match ns {
                    NsMatch::Named(n) => *n == pod.id.namespace,
                    NsMatch::Selector(s) => s.matches(ns_labels),
                }) && sel.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
        }
    }

    /// Human form for dumps.
    pub fn show(&self) -> String {
        match self {
            PeerDef::Pods { ns, pod } => {
                let ns = match ns {
                    NsMatch::Named(n) => format!("ns {n}"),
                    NsMatch::Selector(s) if s.is_empty() => "any ns".to_string(),
                    NsMatch::Selector(s) => format!("ns [{}]", show_selector(s)),
                };
                match pod {
                    None => format!("pods of {ns}"),
                    Some(s) => format!("pods [{}] of {ns}", show_selector(s)),
                }
            }
            PeerDef::Block(b) => {
                let mut s = format!("ipBlock {}", b.cidr);
                if !b.except.is_empty() {
                    let e: Vec<String> = b.except.iter().map(|e| e.to_string()).collect();
                    s.push_str(&format!(" except {}", e.join(",")));
                }
                s
            }
        }
    }
}

fn hash_rules(h: &mut Fnv, policy: &NetworkPolicy, rules: &[PolicyRule]) {
    h.u32(rules.len() as u32);
    for r in rules {
        h.u32(r.peers.len() as u32);
        for p in &r.peers {
            h.u64(PeerDef::of(policy, p).hash());
        }
        h.u32(r.ports.len() as u32);
        for p in &r.ports {
            h.u8(p.protocol.number());
            match &p.port {
                PortMatch::Any => h.u8(0),
                PortMatch::Range(lo, hi) => h.u8(1).u16(*lo).u16(*hi),
                PortMatch::Named(n) => h.u8(2).str(n),
            };
        }
    }
}

/// What a rule id stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: ObjRef,
    pub direction: Direction,
    /// The rule's index, or None for the policy's default-deny pseudo-rule.
    pub index: Option<u32>,
}

impl RuleRef {
    pub fn info(&self) -> RuleInfo {
        let mut info = RuleInfo {
            kind: if self.index.is_some() {
                RULE_KIND_ALLOW
            } else {
                RULE_KIND_DEFAULT_DENY
            },
            direction: self.direction.abi(),
            index: self.index.unwrap_or(0),
            ..Default::default()
        };
        let name = self.policy.to_string();
        let n = name.len().min(RULE_NAME_MAX);
        info.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        info.name_len = n as u16;
        info
    }

    pub fn from_info(info: &RuleInfo) -> Option<RuleRef> {
        let (ns, name) = info.name().split_once('/')?;
        Some(RuleRef {
            policy: ObjRef::new(ns, name),
            direction: if info.direction == weir_common::metrics::DIR_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            index: (info.kind == RULE_KIND_ALLOW).then_some(info.index),
        })
    }
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "{} {}[{i}]", self.policy, self.direction.name()),
            None => write!(f, "{} {} default-deny", self.policy, self.direction.name()),
        }
    }
}

/// Signature of an identity: indices of matched peers (in [`PeerDef`] order), and the
/// numbers declared for each egress named port (index into the names, numbers).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
struct Sig {
    peers: Vec<u32>,
    ports: Vec<(u32, Vec<u16>)>,
}

#[derive(Clone, Debug)]
enum Member {
    Pod { addr: Addr, ip: IpAddr, pod: ObjRef },
    Region { prefix: Lpm<Addr> },
}

/// What the compiler knows about an identity (for dumps and the CLI).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityInfo {
    /// The peers its members match.
    pub peers: Vec<String>,
    /// `name/PROTO=numbers` of the egress named ports its pods declare.
    pub named_ports: Vec<String>,
    pub pods: Vec<(ObjRef, IpAddr)>,
    /// Regions of non-pod address space, named by their prefix.
    pub regions: Vec<String>,
}

/// What the compiler knows about a policy key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub direction: Direction,
    pub policies: Vec<ObjRef>,
    /// `name/PROTO=numbers`: ingress named ports resolved on these pods.
    pub named_ports: Vec<String>,
    pub pods: Vec<ObjRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyInfo {
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// The pod of each `ENDPOINTS` address.
    pub endpoints: BTreeMap<Addr, ObjRef>,
    pub keys: BTreeMap<(Direction, u32), KeyInfo>,
    pub rules: BTreeMap<u32, RuleRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub image: PolicyImage,
    pub info: PolicyInfo,
}

/// The policy compiler of one node, with the memory that keeps numbers stable.
#[derive(Clone, Debug)]
pub struct PolicyCompiler {
    pub options: PolicyOptions,
    /// What the maps hold: the last compiled image, or what was read back on restart.
    prev: PolicyImage,
    /// Signature hash of each identity / key number of `prev` (empty after a restart).
    ident_sigs: BTreeMap<u32, u64>,
    key_sigs: BTreeMap<u32, u64>,
    rules: DenseIds<RuleRef>,
}

impl Default for PolicyCompiler {
    fn default() -> Self {
        Self::new(PolicyOptions::default())
    }
}

/// A policy key being built: direction, selecting policies, ingress named-port resolution.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct KeySig<'c> {
    dir: Direction,
    policies: Vec<&'c ObjRef>,
    resolution: Vec<(String, Protocol, Vec<u16>)>,
}

fn named_port_numbers(pod: &Pod, name: &str, proto: Protocol) -> Vec<u16> {
    let mut v: Vec<u16> = pod.named_port(name, proto).collect();
    v.sort();
    v.dedup();
    v
}

impl PolicyCompiler {
    pub fn new(options: PolicyOptions) -> Self {
        Self {
            options,
            prev: PolicyImage::default(),
            ident_sigs: BTreeMap::new(),
            key_sigs: BTreeMap::new(),
            rules: DenseIds::new(options.max_rules),
        }
    }

    /// Adopts what the pinned maps hold (agent restart): numbers in use are kept for the
    /// same members, keys and rules.
    pub fn seed_from(&mut self, img: &PolicyImage) {
        self.prev = img.clone();
        self.ident_sigs.clear();
        self.key_sigs.clear();
        for (id, info) in &img.rules {
            if let Some(r) = RuleRef::from_info(info) {
                self.rules.seed(r, *id);
            }
        }
    }

    /// The image the compiler last produced (or adopted).
    pub fn current(&self) -> &PolicyImage {
        &self.prev
    }

    /// Compiles the policy maps of node `node`. On error nothing is remembered: the
    /// caller keeps programming the previous image.
    pub fn compile(&mut self, c: &Cluster, node: &str) -> Result<Compiled, PolicyError> {
        let mut rules = self.rules.clone();
        let out = self.compile_inner(c, node, &mut rules)?;
        let used: BTreeSet<&RuleRef> = out.info.rules.values().collect();
        rules.retain(|r| used.contains(r));
        self.rules = rules;
        self.prev = out.image.clone();
        self.ident_sigs = out.ident_sigs;
        self.key_sigs = out.key_sigs;
        Ok(Compiled {
            image: out.image,
            info: out.info,
        })
    }

    fn compile_inner(
        &self,
        c: &Cluster,
        node: &str,
        rule_ids: &mut DenseIds<RuleRef>,
    ) -> Result<Inner, PolicyError> {
        // Local endpoints and the policies selecting each, per direction.
        let locals: Vec<&Pod> = c
            .pods
            .values()
            .filter(|p| {
                p.node_name.as_deref() == Some(node) && p.is_policy_endpoint() && !p.ips.is_empty()
            })
            .collect();
        let mut selecting: Vec<[Vec<&NetworkPolicy>; 2]> = Vec::with_capacity(locals.len());
        let mut relevant: [BTreeMap<&ObjRef, &NetworkPolicy>; 2] = Default::default();
        for pod in &locals {
            let mut per = [Vec::new(), Vec::new()];
            for (d, dir) in Direction::BOTH.iter().enumerate() {
                for p in c.policies.values() {
                    if p.applies_to(*dir) && p.selects(pod) {
                        per[d].push(p);
                        relevant[d].insert(&p.id, p);
                    }
                }
            }
            selecting.push(per);
        }

        // Peers and egress named ports of the relevant rules.
        let mut peer_set: BTreeSet<PeerDef> = BTreeSet::new();
        let mut name_set: BTreeSet<(String, Protocol)> = BTreeSet::new();
        for (d, dir) in Direction::BOTH.iter().enumerate() {
            for p in relevant[d].values() {
                for r in p.rules(*dir) {
                    peer_set.extend(r.peers.iter().map(|x| PeerDef::of(p, x)));
                    if *dir == Direction::Egress {
                        for port in &r.ports {
                            if let PortMatch::Named(n) = &port.port {
                                name_set.insert((n.clone(), port.protocol));
                            }
                        }
                    }
                }
            }
        }
        let peers: Vec<PeerDef> = peer_set.into_iter().collect();
        let peer_index: HashMap<&PeerDef, u32> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p, i as u32))
            .collect();
        let peer_hash: Vec<u64> = peers.iter().map(|p| p.hash()).collect();
        let names: Vec<(String, Protocol)> = name_set.into_iter().collect();
        let selector_peers: Vec<u32> = (0..peers.len() as u32)
            .filter(|i| matches!(peers[*i as usize], PeerDef::Pods { .. }))
            .collect();
        let block_peers: Vec<(u32, &IpBlock)> = peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p {
                PeerDef::Block(b) => Some((i as u32, b)),
                _ => None,
            })
            .collect();

        // Classes: pod addresses (cluster-wide) and regions.
        let mut classes: BTreeMap<Sig, Vec<Member>> = BTreeMap::new();
        let mut pod_ips: HashSet<Addr> = HashSet::new();
        let mut label_cache: HashMap<(&str, &Labels), Vec<u32>> = HashMap::new();
        for pod in c.pods.values() {
            if !pod.is_policy_endpoint() || pod.ips.is_empty() {
                continue;
            }
            let sel = label_cache
                .entry((pod.id.namespace.as_str(), &pod.labels))
                .or_insert_with(|| {
                    let ns_labels = c.namespace_labels(&pod.id.namespace);
                    selector_peers
                        .iter()
                        .copied()
                        .filter(|i| peers[*i as usize].matches_pod(pod, &ns_labels))
                        .collect()
                })
                .clone();
            let ports: Vec<(u32, Vec<u16>)> = names
                .iter()
                .enumerate()
                .filter_map(|(i, (n, proto))| {
                    let v = named_port_numbers(pod, n, *proto);
                    (!v.is_empty()).then_some((i as u32, v))
                })
                .collect();
            for ip in &pod.ips {
                let ip = ip.to_canonical();
                let addr = Addr::from_ip(ip);
                // An address held by two pods (a broken snapshot): the first one wins.
                if !pod_ips.insert(addr) {
                    continue;
                }
                let mut ps = sel.clone();
                ps.extend(
                    block_peers
                        .iter()
                        .filter(|(_, b)| b.contains(ip))
                        .map(|(i, _)| *i),
                );
                ps.sort();
                classes
                    .entry(Sig {
                        peers: ps,
                        ports: ports.clone(),
                    })
                    .or_default()
                    .push(Member::Pod {
                        addr,
                        ip,
                        pod: pod.id.clone(),
                    });
            }
        }
        let mut prefixes: BTreeSet<IpNet> = BTreeSet::from([
            "0.0.0.0/0".parse().expect("net"),
            "::/0".parse().expect("net"),
        ]);
        for (_, b) in &block_peers {
            prefixes.insert(b.cidr);
            prefixes.extend(b.except.iter().copied());
        }
        for p in &prefixes {
            let is_host = p.prefix_len() == p.max_prefix_len();
            if is_host && pod_ips.contains(&Addr::from_ip(p.addr())) {
                continue; // the pod's own entry replaces this one-address region
            }
            let ps: Vec<u32> = block_peers
                .iter()
                .filter(|(_, b)| b.cidr.contains(p) && !b.except.iter().any(|e| e.contains(p)))
                .map(|(i, _)| *i)
                .collect();
            classes
                .entry(Sig {
                    peers: ps,
                    ports: vec![],
                })
                .or_default()
                .push(Member::Region {
                    prefix: addr_prefix(p),
                });
        }
        let classes: Vec<(Sig, Vec<Member>)> = classes.into_iter().collect();
        let sig_hash: Vec<u64> = classes
            .iter()
            .map(|(s, _)| {
                let mut h = Fnv::default();
                h.u32(s.peers.len() as u32);
                for p in &s.peers {
                    h.u64(peer_hash[*p as usize]);
                }
                h.u32(s.ports.len() as u32);
                for (n, nums) in &s.ports {
                    let (name, proto) = &names[*n as usize];
                    h.str(name).u8(proto.number()).u32(nums.len() as u32);
                    for x in nums {
                        h.u16(*x);
                    }
                }
                h.finish()
            })
            .collect();

        let ids = self.assign_identities(&classes, &sig_hash)?;

        // Which classes contain each peer.
        let mut peer_classes: Vec<Vec<usize>> = vec![Vec::new(); peers.len()];
        for (ci, (sig, _)) in classes.iter().enumerate() {
            for p in &sig.peers {
                peer_classes[*p as usize].push(ci);
            }
        }

        let mut image = PolicyImage::default();
        let mut info = PolicyInfo::default();

        // IPCACHE: regions, then pods that differ from their region, then this node's
        // own addresses.
        let mut regions: BTreeMap<Lpm<Addr>, u32> = BTreeMap::new();
        for (ci, (sig, members)) in classes.iter().enumerate() {
            let ii = info.identities.entry(ids[ci]).or_default();
            ii.peers = sig
                .peers
                .iter()
                .map(|p| peers[*p as usize].show())
                .collect();
            ii.named_ports = sig
                .ports
                .iter()
                .map(|(n, nums)| {
                    let (name, proto) = &names[*n as usize];
                    let nums: Vec<String> = nums.iter().map(|x| x.to_string()).collect();
                    format!("{name}/{proto}={}", nums.join(","))
                })
                .collect();
            for m in members {
                match m {
                    Member::Region { prefix } => {
                        regions.insert(*prefix, ids[ci]);
                        ii.regions.push(show_addr_prefix(prefix));
                    }
                    Member::Pod { ip, pod, .. } => ii.pods.push((pod.clone(), *ip)),
                }
            }
        }
        for (prefix, id) in &regions {
            image.ipcache.insert(
                *prefix,
                IpcacheValue {
                    identity: *id,
                    flags: 0,
                },
            );
        }
        let region_plens = prefix_lengths(&regions);
        for (ci, (_, members)) in classes.iter().enumerate() {
            for m in members {
                if let Member::Pod { addr, .. } = m
                    && lpm_get_among(&regions, addr, region_plens.iter().copied()).map(|x| x.1)
                        != Some(ids[ci])
                {
                    image.ipcache.insert(
                        (128, *addr),
                        IpcacheValue {
                            identity: ids[ci],
                            flags: 0,
                        },
                    );
                }
            }
        }
        if let Some(n) = c.nodes.get(node) {
            for ip in n.internal_ips.iter().chain(n.external_ips.iter()) {
                let addr = Addr::from_ip(ip.to_canonical());
                let identity = lpm_get(&image.ipcache, &addr, 128)
                    .map(|x| x.1.identity)
                    .unwrap_or(ID_UNKNOWN);
                image.ipcache.insert(
                    (128, addr),
                    IpcacheValue {
                        identity,
                        flags: IC_F_LOCAL_NODE,
                    },
                );
            }
        }

        // Policy keys.
        let mut keys: BTreeMap<KeySig, Vec<usize>> = BTreeMap::new();
        let mut pod_keys: Vec<[u32; 2]> = vec![[0, 0]; locals.len()];
        for (li, pod) in locals.iter().enumerate() {
            for (d, dir) in Direction::BOTH.iter().enumerate() {
                let pols = &selecting[li][d];
                if pols.is_empty() {
                    continue;
                }
                let mut resolution = Vec::new();
                if *dir == Direction::Ingress {
                    let mut used: BTreeSet<(&str, Protocol)> = BTreeSet::new();
                    for p in pols {
                        for r in p.rules(*dir) {
                            for port in &r.ports {
                                if let PortMatch::Named(n) = &port.port {
                                    used.insert((n, port.protocol));
                                }
                            }
                        }
                    }
                    for (n, proto) in used {
                        resolution.push((n.to_string(), proto, named_port_numbers(pod, n, proto)));
                    }
                }
                keys.entry(KeySig {
                    dir: *dir,
                    policies: pols.iter().map(|p| &p.id).collect(),
                    resolution,
                })
                .or_default()
                .push(li);
            }
        }
        let prev_keys: BTreeSet<u32> = self
            .prev
            .endpoints
            .values()
            .flat_map(|e| [e.ingress_key, e.egress_key])
            .filter(|k| *k != 0)
            .collect();
        let mut key_ids: BTreeMap<u32, u64> = BTreeMap::new();
        let mut key_list: Vec<(u32, &KeySig, &Vec<usize>)> = Vec::new();
        for (ks, members) in &keys {
            let mut h = Fnv::default();
            h.u8(ks.dir.abi()).u32(ks.policies.len() as u32);
            for id in &ks.policies {
                let p = &c.policies[*id];
                h.str(&id.namespace).str(&id.name);
                hash_rules(&mut h, p, p.rules(ks.dir));
            }
            h.u32(ks.resolution.len() as u32);
            for (n, proto, nums) in &ks.resolution {
                h.str(n).u8(proto.number()).u32(nums.len() as u32);
                for x in nums {
                    h.u16(*x);
                }
            }
            let hash = h.finish();
            let first = preferred(hash);
            let id = probe(hash, |k| {
                !key_ids.contains_key(&k)
                    && (!prev_keys.contains(&k)
                        || match self.key_sigs.get(&k) {
                            Some(old) => *old == hash,
                            // After a restart: trust that the number this content hashes
                            // to first still holds this content.
                            None => k == first,
                        })
            })
            .ok_or(PolicyError::IdsExhausted { what: "policy key" })?;
            key_ids.insert(id, hash);
            key_list.push((id, ks, members));
            for li in members.iter() {
                pod_keys[*li][if ks.dir == Direction::Ingress { 0 } else { 1 }] = id;
            }
        }

        // Policy entries.
        let rule_peer_idx = |p: &NetworkPolicy, r: &PolicyRule| -> Vec<u32> {
            r.peers
                .iter()
                .map(|x| peer_index[&PeerDef::of(p, x)])
                .collect()
        };
        for (pk, ks, members) in &key_list {
            let dir = ks.dir;
            let d = dir.abi();
            let mut any_rules = false;
            let emit = |image: &mut PolicyImage,
                        identity: u32,
                        proto: u8,
                        port: u16,
                        plen: u32,
                        rule_id: u32| {
                let key = PolicyKey {
                    policy_key: *pk,
                    identity,
                    direction: d,
                    proto,
                    port_be: port.to_be(),
                }
                .masked(plen);
                image.policy.entry((plen, key)).or_insert(PolicyValue {
                    verdict: VERDICT_ALLOW,
                    reason: 0,
                    pad: [0; 2],
                    rule_id,
                });
            };
            for pid in &ks.policies {
                let p = &c.policies[*pid];
                for (i, r) in p.rules(dir).iter().enumerate() {
                    any_rules = true;
                    let rr = RuleRef {
                        policy: p.id.clone(),
                        direction: dir,
                        index: Some(i as u32),
                    };
                    let rid =
                        rule_ids
                            .get_or_alloc(&rr)
                            .ok_or_else(|| PolicyError::RulesExhausted {
                                policy: p.id.clone(),
                                max: self.options.max_rules,
                            })?;
                    // None: any identity.
                    let targets: Option<Vec<usize>> = if r.peers.is_empty() {
                        None
                    } else {
                        let mut v: Vec<usize> = rule_peer_idx(p, r)
                            .iter()
                            .flat_map(|i| peer_classes[*i as usize].iter().copied())
                            .collect();
                        v.sort();
                        v.dedup();
                        Some(v)
                    };
                    let target_ids: Vec<u32> = match &targets {
                        None => vec![ID_ANY],
                        Some(v) => v.iter().map(|ci| ids[*ci]).collect(),
                    };
                    if r.ports.is_empty() {
                        for t in &target_ids {
                            emit(&mut image, *t, 0, 0, POLICY_PLEN_ANY_PROTO, rid);
                        }
                        continue;
                    }
                    for port in &r.ports {
                        let proto = port.protocol.number();
                        match &port.port {
                            PortMatch::Any => {
                                for t in &target_ids {
                                    emit(&mut image, *t, proto, 0, POLICY_PLEN_ANY_PORT, rid);
                                }
                            }
                            PortMatch::Range(lo, hi) => {
                                for (start, bits) in port_prefixes(*lo, *hi) {
                                    for t in &target_ids {
                                        emit(
                                            &mut image,
                                            *t,
                                            proto,
                                            start,
                                            POLICY_PLEN_ANY_PORT + bits,
                                            rid,
                                        );
                                    }
                                }
                            }
                            PortMatch::Named(n) if dir == Direction::Ingress => {
                                // Resolved on the local pods of this key (all alike).
                                let nums = ks
                                    .resolution
                                    .iter()
                                    .find(|(rn, rp, _)| rn == n && *rp == port.protocol)
                                    .map(|x| x.2.clone())
                                    .unwrap_or_default();
                                for num in nums {
                                    for t in &target_ids {
                                        emit(&mut image, *t, proto, num, POLICY_PLEN_FULL, rid);
                                    }
                                }
                            }
                            PortMatch::Named(n) => {
                                // Resolved on each destination identity.
                                let Some(ni) = names
                                    .iter()
                                    .position(|(rn, rp)| rn == n && *rp == port.protocol)
                                else {
                                    continue;
                                };
                                let cands: Vec<usize> = match &targets {
                                    None => (0..classes.len()).collect(),
                                    Some(v) => v.clone(),
                                };
                                for ci in cands {
                                    let sig = &classes[ci].0;
                                    if let Some((_, nums)) =
                                        sig.ports.iter().find(|(i, _)| *i as usize == ni)
                                    {
                                        for num in nums {
                                            emit(
                                                &mut image,
                                                ids[ci],
                                                proto,
                                                *num,
                                                POLICY_PLEN_FULL,
                                                rid,
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // The catch-all: what the ID_ANY lookup finds when nothing else matches.
            let first = ks.policies[0];
            let deny = RuleRef {
                policy: first.clone(),
                direction: dir,
                index: None,
            };
            let key = PolicyKey {
                policy_key: *pk,
                identity: ID_ANY,
                direction: d,
                proto: 0,
                port_be: 0,
            };
            if let std::collections::btree_map::Entry::Vacant(slot) =
                image.policy.entry((POLICY_PLEN_ANY_PROTO, key))
            {
                let rid =
                    rule_ids
                        .get_or_alloc(&deny)
                        .ok_or_else(|| PolicyError::RulesExhausted {
                            policy: first.clone(),
                            max: self.options.max_rules,
                        })?;
                slot.insert(PolicyValue {
                    verdict: VERDICT_DENY,
                    reason: if any_rules {
                        REASON_POLICY_DENIED
                    } else {
                        REASON_POLICY_ISOLATED
                    },
                    pad: [0; 2],
                    rule_id: rid,
                });
            }
            let named: Vec<String> = ks
                .resolution
                .iter()
                .map(|(n, proto, nums)| {
                    let nums: Vec<String> = nums.iter().map(|x| x.to_string()).collect();
                    format!("{n}/{proto}={}", nums.join(","))
                })
                .collect();
            info.keys.insert(
                (dir, *pk),
                KeyInfo {
                    direction: dir,
                    policies: ks.policies.iter().map(|p| (*p).clone()).collect(),
                    named_ports: named,
                    pods: members.iter().map(|li| locals[*li].id.clone()).collect(),
                },
            );
        }
        prune(&mut image.policy);

        // ENDPOINTS.
        for (li, pod) in locals.iter().enumerate() {
            let [ik, ek] = pod_keys[li];
            let mut flags = 0;
            if ik != 0 {
                flags |= EP_F_INGRESS_ISOLATED;
            }
            if ek != 0 {
                flags |= EP_F_EGRESS_ISOLATED;
            }
            for ip in &pod.ips {
                info.endpoints
                    .entry(Addr::from_ip(ip.to_canonical()))
                    .or_insert_with(|| pod.id.clone());
                image
                    .endpoints
                    .entry(Addr::from_ip(ip.to_canonical()))
                    .or_insert(EndpointValue {
                        ingress_key: ik,
                        egress_key: ek,
                        flags,
                        ifindex: 0,
                    });
            }
        }

        // POLICY_RULES: every rule id an entry names.
        let used: BTreeSet<u32> = image.policy.values().map(|v| v.rule_id).collect();
        for (r, id) in rule_ids.iter() {
            if used.contains(&id) {
                image.rules.insert(id, r.info());
                info.rules.insert(id, r.clone());
            }
        }

        let ident_sigs = classes
            .iter()
            .enumerate()
            .map(|(ci, _)| (ids[ci], sig_hash[ci]))
            .collect();
        Ok(Inner {
            image,
            info,
            ident_sigs,
            key_sigs: key_ids,
        })
    }

    /// Numbers for the classes: unchanged signatures keep theirs, changed ones inherit
    /// their members' majority number, new ones hash (see the module doc).
    fn assign_identities(
        &self,
        classes: &[(Sig, Vec<Member>)],
        sig_hash: &[u64],
    ) -> Result<Vec<u32>, PolicyError> {
        let prev_ids: BTreeSet<u32> = self.prev.ipcache.values().map(|v| v.identity).collect();
        let prev_plens: BTreeSet<u32> = self.prev.ipcache.keys().map(|(p, _)| *p).collect();
        let old_id = |addr: &Addr, max: u32| -> Option<u32> {
            prev_plens
                .iter()
                .rev()
                .filter(|p| **p <= max)
                .find_map(|p| {
                    // (A node-address entry holds the number of its address's class,
                    // so it votes like any other.)
                    self.prev
                        .ipcache
                        .get(&(*p, addr.masked(*p)))
                        .map(|v| v.identity)
                })
        };
        let mut out: Vec<Option<u32>> = vec![None; classes.len()];
        let mut claimed: BTreeSet<u32> = BTreeSet::new();
        // 1. Unchanged signatures keep their number.
        let by_sig: HashMap<u64, u32> = self
            .ident_sigs
            .iter()
            .filter(|(id, _)| prev_ids.contains(id))
            .map(|(id, h)| (*h, *id))
            .collect();
        for (ci, h) in sig_hash.iter().enumerate() {
            if let Some(id) = by_sig.get(h)
                && claimed.insert(*id)
            {
                out[ci] = Some(*id);
            }
        }
        // 2. Changed signatures inherit the number most of their members had.
        let mut votes: Vec<(usize, usize, u32)> = Vec::new();
        for (ci, (_, members)) in classes.iter().enumerate() {
            if out[ci].is_some() {
                continue;
            }
            let mut count: BTreeMap<u32, usize> = BTreeMap::new();
            for m in members {
                let old = match m {
                    Member::Pod { addr, .. } => old_id(addr, 128),
                    Member::Region { prefix } => old_id(&prefix.1, prefix.0),
                };
                if let Some(o) = old
                    && !claimed.contains(&o)
                {
                    *count.entry(o).or_default() += 1;
                }
            }
            votes.extend(count.into_iter().map(|(id, n)| (n, ci, id)));
        }
        votes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        for (_, ci, id) in votes {
            if out[ci].is_none() && !claimed.contains(&id) {
                claimed.insert(id);
                out[ci] = Some(id);
            }
        }
        // 3. New classes: the number their signature hashes to, past numbers in use.
        for (ci, h) in sig_hash.iter().enumerate() {
            if out[ci].is_none() {
                let id = probe(*h, |k| !claimed.contains(&k) && !prev_ids.contains(&k))
                    .ok_or(PolicyError::IdsExhausted { what: "identity" })?;
                claimed.insert(id);
                out[ci] = Some(id);
            }
        }
        Ok(out.into_iter().map(|x| x.expect("assigned")).collect())
    }
}

struct Inner {
    image: PolicyImage,
    info: PolicyInfo,
    ident_sigs: BTreeMap<u32, u64>,
    key_sigs: BTreeMap<u32, u64>,
}

/// Drops allow entries that a shorter allow of the same key and identity, or of
/// [`ID_ANY`], already covers: the lookup sequence allows them anyway.
fn prune(policy: &mut BTreeMap<Lpm<PolicyKey>, PolicyValue>) {
    // Only lengths some allow entry has can cover anything: probing just those keeps this
    // at a few lookups per entry (it runs on every compile, over every entry).
    let present: BTreeSet<u32> = policy
        .iter()
        .filter(|(_, v)| v.verdict == VERDICT_ALLOW)
        .map(|((plen, _), _)| *plen)
        .filter(|p| {
            *p == POLICY_PLEN_ANY_PROTO || (POLICY_PLEN_ANY_PORT..=POLICY_PLEN_FULL).contains(p)
        })
        .collect();
    let plens = |max: u32| present.iter().copied().filter(move |p| *p <= max);
    let covered: Vec<Lpm<PolicyKey>> = policy
        .iter()
        .filter(|(_, v)| v.verdict == VERDICT_ALLOW)
        .filter(|((plen, key), _)| {
            let mut any = *key;
            any.identity = ID_ANY;
            let shorter_same = plens(*plen - 1).any(|p| {
                policy
                    .get(&(p, key.masked(p)))
                    .is_some_and(|v| v.verdict == VERDICT_ALLOW)
            });
            let by_any = key.identity != ID_ANY
                && plens(*plen).any(|p| {
                    policy
                        .get(&(p, any.masked(p)))
                        .is_some_and(|v| v.verdict == VERDICT_ALLOW)
                });
            shorter_same || by_any
        })
        .map(|(k, _)| *k)
        .collect();
    for k in covered {
        policy.remove(&k);
    }
}
