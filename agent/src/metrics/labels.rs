//! Which Service port a `svc_port_id` is, and which Service ports get their own series.
//!
//! The datapath counts per Service port id (the rev-NAT id of the port's ClusterIP
//! frontend, in every master entry). The agent keeps the id -> {namespace, name, port,
//! protocol} table here, updated after each sync for the Services that sync touched.
//!
//! Cardinality: at most `limit` Service ports get their own series; the others are
//! summed into one `other` series. Membership is sticky: a Service port keeps its series
//! for as long as it exists, and a freed place goes to the next new Service port, so no
//! series moves in or out of `other` while its Service exists (which would make counters
//! jump). `other` decreases only when a Service port summed into it is deleted.

use std::collections::{BTreeMap, BTreeSet};

use weir_common::lb::{SCOPE_CLUSTER, SVC_F_VIP_MARKER};
use weir_core::{image::MapImage, model::ObjRef};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SvcLabel {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub protocol: &'static str,
}

#[derive(Clone, Debug)]
pub struct ServiceLabels {
    pub by_id: BTreeMap<u32, SvcLabel>,
    by_service: BTreeMap<ObjRef, BTreeSet<u32>>,
    /// Ids with their own series.
    pub members: BTreeSet<u32>,
    pub limit: usize,
    /// Ids that left the table whose counters are still to be deleted: once their
    /// REV_NAT entry is gone from the maps (the syncer releases an id only then, and
    /// masters go before their REV_NAT entry), so a reused id starts from zero.
    gone: BTreeSet<u32>,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        weir_common::proto::TCP => "TCP",
        weir_common::proto::UDP => "UDP",
        weir_common::proto::SCTP => "SCTP",
        _ => "other",
    }
}

/// The Service port ids of one Service's image, with their labels.
pub fn ports_of(svc: &ObjRef, img: &MapImage) -> BTreeMap<u32, SvcLabel> {
    let mut out = BTreeMap::new();
    for (k, v) in &img.services {
        if k.slot != 0 || k.scope != SCOPE_CLUSTER || v.flags & SVC_F_VIP_MARKER != 0 {
            continue;
        }
        let id = v.svc_port_id;
        if id == 0 || out.contains_key(&id) {
            continue;
        }
        // The id is the rev-NAT id of the port's ClusterIP frontend: its REV_NAT entry
        // names the Service port.
        let (port, proto) = match img.rev_nat.get(&id) {
            Some(rn) => (u16::from_be(rn.port_be), rn.proto),
            None => (u16::from_be(k.port_be), k.proto),
        };
        out.insert(
            id,
            SvcLabel {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                port,
                protocol: proto_name(proto),
            },
        );
    }
    out
}

impl ServiceLabels {
    pub fn new(limit: usize) -> ServiceLabels {
        ServiceLabels {
            by_id: BTreeMap::new(),
            by_service: BTreeMap::new(),
            members: BTreeSet::new(),
            limit,
            gone: BTreeSet::new(),
        }
    }

    /// Replaces what is known of `svc` by the ports of `img` (None: the Service has no
    /// image any more).
    pub fn update(&mut self, svc: &ObjRef, img: Option<&MapImage>) {
        let new = img.map(|i| ports_of(svc, i)).unwrap_or_default();
        let old = self.by_service.remove(svc).unwrap_or_default();
        for id in &old {
            if !new.contains_key(id) {
                self.by_id.remove(id);
                self.members.remove(id);
                self.gone.insert(*id);
            }
        }
        for (id, l) in &new {
            self.gone.remove(id);
            self.by_id.insert(*id, l.clone());
            if !self.members.contains(id) && self.members.len() < self.limit {
                self.members.insert(*id);
            }
        }
        if !new.is_empty() {
            self.by_service
                .insert(svc.clone(), new.keys().copied().collect());
        }
    }

    /// Rebuilds from every Service's image, in namespace/name order (first full sync).
    pub fn rebuild<'a>(&mut self, images: impl Iterator<Item = (&'a ObjRef, &'a MapImage)>) {
        let keep: BTreeSet<ObjRef> = self.by_service.keys().cloned().collect();
        let mut seen = BTreeSet::new();
        for (svc, img) in images {
            seen.insert(svc.clone());
            self.update(svc, Some(img));
        }
        for svc in keep.difference(&seen) {
            self.update(svc, None);
        }
    }

    /// Ids whose counters can be deleted now: gone from the table, and `in_maps` says
    /// their REV_NAT entry is gone too. They are forgotten.
    pub fn collectable(&mut self, in_maps: impl Fn(u32) -> bool) -> Vec<u32> {
        let out: Vec<u32> = self
            .gone
            .iter()
            .copied()
            .filter(|id| !in_maps(*id))
            .collect();
        for id in &out {
            self.gone.remove(id);
        }
        out
    }
}
