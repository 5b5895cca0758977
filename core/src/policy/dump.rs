//! A readable dump of the policy maps (golden tests, the CLI later): every map entry,
//! with what its numbers stand for.

use std::fmt::Write as _;

use weir_common::{Addr, metrics::*, policy::*, proto};

use super::{
    compile::Compiled,
    image::{policy_key_bytes, show_addr_prefix},
};

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        n => format!("proto {n}"),
    }
}

fn dir_name(d: u8) -> &'static str {
    if d == DIR_EGRESS { "egress" } else { "ingress" }
}

/// "TCP 80", "UDP 8000-8063", "SCTP any port", "any protocol".
pub fn show_l4(plen: u32, key: &PolicyKey) -> String {
    if plen <= POLICY_PLEN_ANY_PROTO {
        return "any protocol".into();
    }
    let p = proto_name(key.proto);
    if plen <= POLICY_PLEN_ANY_PORT {
        return format!("{p} any port");
    }
    let bits = plen - POLICY_PLEN_ANY_PORT;
    let start = u16::from_be(key.port_be);
    let end = start as u32 + (1u32 << (16 - bits)) - 1;
    if bits == 16 {
        format!("{p} {start}")
    } else {
        format!("{p} {start}-{end}")
    }
}

/// The whole dump.
pub fn dump(c: &Compiled) -> String {
    let img = &c.image;
    let info = &c.info;
    let mut s = String::new();
    let rule = |id: u32| {
        info.rules
            .get(&id)
            .map(|r| r.to_string())
            .or_else(|| img.rules.get(&id).map(|r| r.name().to_string()))
            .unwrap_or_else(|| format!("rule {id}"))
    };
    let _ = writeln!(
        s,
        "# sizes: IPCACHE {} ENDPOINTS {} POLICY {} POLICY_RULES {}",
        img.ipcache.len(),
        img.endpoints.len(),
        img.policy.len(),
        img.rules.len()
    );
    let _ = writeln!(s, "\n# identities");
    for (id, ii) in &info.identities {
        let mut members: Vec<String> = ii.pods.iter().map(|(p, ip)| format!("{p} {ip}")).collect();
        members.extend(ii.regions.iter().map(|r| format!("region {r}")));
        let _ = writeln!(s, "identity {id}: {}", members.join(", "));
        let peers = if ii.peers.is_empty() {
            "no peer".to_string()
        } else {
            ii.peers.join("; ")
        };
        let _ = writeln!(s, "  matches: {peers}");
        if !ii.named_ports.is_empty() {
            let _ = writeln!(s, "  named ports: {}", ii.named_ports.join(", "));
        }
    }
    let _ = writeln!(s, "\n# IPCACHE");
    for (k, v) in &img.ipcache {
        let flag = if v.flags & IC_F_LOCAL_NODE != 0 {
            " local-node"
        } else {
            ""
        };
        let _ = writeln!(s, "{} -> {}{flag}", show_addr_prefix(k), v.identity);
    }
    let _ = writeln!(s, "\n# ENDPOINTS");
    for (a, v) in &img.endpoints {
        let pod = info
            .endpoints
            .get(a)
            .map(|p| p.to_string())
            .unwrap_or_default();
        let side = |iso: u32, key: u32| {
            if v.flags & iso != 0 {
                format!("key {key}")
            } else {
                "not isolated".into()
            }
        };
        let _ = writeln!(
            s,
            "{a} {pod}: ingress {}, egress {}",
            side(EP_F_INGRESS_ISOLATED, v.ingress_key),
            side(EP_F_EGRESS_ISOLATED, v.egress_key)
        );
    }
    let _ = writeln!(s, "\n# POLICY");
    let mut entries: Vec<(&(u32, PolicyKey), &PolicyValue)> = img.policy.iter().collect();
    // By key and direction; within one, identity then protocol then port (ANY first).
    entries.sort_by_key(|((plen, k), _)| {
        (
            k.policy_key,
            k.direction,
            k.identity,
            policy_key_bytes(k)[9..].to_vec(),
            *plen,
        )
    });
    let mut last: Option<(u32, u8)> = None;
    for ((plen, k), v) in entries {
        if last != Some((k.policy_key, k.direction)) {
            last = Some((k.policy_key, k.direction));
            let dir = if k.direction == DIR_EGRESS {
                super::eval::Direction::Egress
            } else {
                super::eval::Direction::Ingress
            };
            let _ = write!(s, "key {} {}", k.policy_key, dir_name(k.direction));
            if let Some(ki) = info.keys.get(&(dir, k.policy_key)) {
                let pols: Vec<String> = ki.policies.iter().map(|p| p.to_string()).collect();
                let pods: Vec<String> = ki.pods.iter().map(|p| p.to_string()).collect();
                let _ = write!(
                    s,
                    " (policies {}; pods {}",
                    pols.join(", "),
                    pods.join(", ")
                );
                if !ki.named_ports.is_empty() {
                    let _ = write!(s, "; named ports {}", ki.named_ports.join(", "));
                }
                let _ = write!(s, ")");
            }
            let _ = writeln!(s);
        }
        let who = if k.identity == ID_ANY {
            "any identity".to_string()
        } else {
            format!("identity {}", k.identity)
        };
        let verdict = match (v.verdict, v.reason) {
            (VERDICT_ALLOW, _) => format!("allow by {}", rule(v.rule_id)),
            (VERDICT_DENY, REASON_POLICY_ISOLATED) => {
                format!("deny (isolated, no rules) counted on {}", rule(v.rule_id))
            }
            (VERDICT_DENY, _) => format!("deny (no rule allows) counted on {}", rule(v.rule_id)),
            (x, _) => format!("verdict {x}?"),
        };
        let _ = writeln!(s, "  {who} {} -> {verdict}", show_l4(*plen, k));
    }
    let _ = writeln!(s, "\n# POLICY_RULES");
    for (id, r) in &img.rules {
        let kind = if r.kind == RULE_KIND_ALLOW {
            format!("{}[{}]", dir_name(r.direction), r.index)
        } else {
            format!("{} default-deny", dir_name(r.direction))
        };
        let _ = writeln!(s, "{id} {} {kind}", r.name());
    }
    s
}

/// `Addr` as the dump prints it (for callers composing their own output).
pub fn show_addr(a: &Addr) -> String {
    a.to_string()
}
