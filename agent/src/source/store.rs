//! [`Store`]: the cluster objects every source delivered, as `weir_core::model` objects,
//! fed by [`Event`]s, producing [`ChangeSet`]s.
//!
//! It is a reflector store in kube-rs' sense (the same `Init`/`InitApply`/`InitDone`
//! semantics as `kube::runtime::reflector::store::Writer::apply_watcher_event`), with two
//! things a node dataplane needs on top:
//!
//! - change sets: which objects really changed since the last sync (an `Apply` that
//!   converts to the same model object, like a Node heartbeat, is not a change), and
//!   which objects a re-list dropped (deleted while the watch was down);
//! - readiness: a source is synced once every kind it registered has delivered its
//!   initial list; until every source is synced the sync loop deletes nothing.
//!
//! It keeps only converted objects, not the API objects (kube's own reflector store
//! would hold the full objects a second time for no reader).
//!
//! Invalid objects (conversion errors) are logged with their kind and name and counted;
//! an object that was valid before keeps its previous version, so bad input never
//! removes programmed state. Keys are global across sources (kind, namespace, name):
//! when two sources deliver the same key, the later event wins.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{debug, warn};
use weir_core::{
    model::{Cluster, ObjRef},
    pipeline::ChangeSet,
};

use super::{Event, Kind, Object, SourceEvent, SourceId, convert};

/// Counters of the store (exported by the metrics issue).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreCounters {
    pub events: u64,
    /// Objects that failed conversion (each failing Apply counts).
    pub invalid: u64,
    /// Completed (re-)lists, all kinds.
    pub lists: u64,
}

#[derive(Clone, Debug, Default)]
struct SourceState {
    name: String,
    kinds: BTreeSet<Kind>,
    listed: BTreeSet<Kind>,
    generation: u64,
}

#[derive(Default)]
pub struct Store {
    cluster: Cluster,
    /// Every object's key, with the source that delivered it last.
    keys: BTreeMap<(Kind, ObjRef), SourceId>,
    /// Objects of a listing in progress, per (source, kind).
    init: BTreeMap<(SourceId, Kind), BTreeMap<ObjRef, Object>>,
    sources: Vec<SourceState>,
    changes: ChangeSet,
    generation_changed: bool,
    /// The store became synced since the last `take_changes` (a sync must follow even if
    /// no object changed: deletions are allowed from now on).
    became_synced: bool,
    /// Objects whose latest version failed conversion, with the reason.
    invalid: BTreeMap<(Kind, ObjRef), String>,
    /// When each object in `changes` first changed since the last sync (the start of its
    /// programming latency).
    first_seen: BTreeMap<(Kind, ObjRef), std::time::Instant>,
    pub counters: StoreCounters,
}

/// A converted object.
enum Model {
    Service(weir_core::model::Service),
    Slice(weir_core::model::EndpointSlice),
    Node(weir_core::model::Node),
    Pod(weir_core::model::Pod),
    Namespace(weir_core::model::Namespace),
    Policy(weir_core::model::NetworkPolicy),
}

fn to_model(obj: &Object) -> Result<Model, convert::ConvertError> {
    Ok(match obj {
        Object::Service(s) => Model::Service(convert::service(s)?),
        Object::EndpointSlice(s) => Model::Slice(convert::endpoint_slice(s)?),
        Object::Node(n) => Model::Node(convert::node(n)?),
        Object::Pod(p) => Model::Pod(convert::pod(p)?),
        Object::Namespace(n) => Model::Namespace(convert::namespace(n)?),
        Object::NetworkPolicy(n) => Model::Policy(convert::network_policy(n)?),
    })
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Registers a source that will deliver `kinds`; the store is synced once each of
    /// them has delivered an `InitDone`.
    pub fn register(&mut self, name: &str, kinds: &[Kind]) -> SourceId {
        self.sources.push(SourceState {
            name: name.to_string(),
            kinds: kinds.iter().copied().collect(),
            ..Default::default()
        });
        self.sources.len() - 1
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Every registered source has listed every kind it registered.
    pub fn synced(&self) -> bool {
        self.sources.iter().all(|s| s.listed == s.kinds)
    }

    /// Kinds still waiting for their initial list, as "source/Kind".
    pub fn waiting_for(&self) -> Vec<String> {
        self.sources
            .iter()
            .flat_map(|s| {
                s.kinds
                    .difference(&s.listed)
                    .map(move |k| format!("{}/{k}", s.name))
            })
            .collect()
    }

    /// The highest input generation any source reported.
    pub fn generation(&self) -> u64 {
        self.sources.iter().map(|s| s.generation).max().unwrap_or(0)
    }

    /// Whether something changed since the last [`Store::take_changes`].
    pub fn dirty(&self) -> bool {
        !self.changes.is_empty() || self.generation_changed || self.became_synced
    }

    /// The changes since the last call.
    pub fn take_changes(&mut self) -> ChangeSet {
        self.generation_changed = false;
        self.became_synced = false;
        self.first_seen.clear();
        std::mem::take(&mut self.changes)
    }

    /// The changes not yet taken.
    pub fn changes(&self) -> &ChangeSet {
        &self.changes
    }

    /// For each object changed since the last [`Store::take_changes`], its kind and when
    /// its first change arrived. Call before `take_changes`.
    pub fn change_times(&self) -> Vec<(Kind, std::time::Instant)> {
        self.first_seen.iter().map(|((k, _), t)| (*k, *t)).collect()
    }

    /// Objects whose latest version failed conversion, counted by kind.
    pub fn invalid_by_kind(&self) -> BTreeMap<Kind, usize> {
        let mut m = BTreeMap::new();
        for (k, _) in self.invalid.keys() {
            *m.entry(*k).or_default() += 1;
        }
        m
    }

    fn changed(&mut self, kind: Kind, key: ObjRef) {
        self.first_seen
            .entry((kind, key))
            .or_insert_with(std::time::Instant::now);
    }

    /// Objects whose latest version failed conversion: "Kind ns/name: reason".
    pub fn invalid(&self) -> impl Iterator<Item = &String> {
        self.invalid.values()
    }

    /// Number of objects per kind.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let mut m = BTreeMap::new();
        for (k, _) in self.keys.keys() {
            *m.entry(*k).or_default() += 1;
        }
        m
    }

    pub fn apply(&mut self, ev: SourceEvent) {
        self.counters.events += 1;
        let source = ev.source;
        match ev.event {
            Event::Init(kind) => {
                self.init.insert((source, kind), BTreeMap::new());
            }
            Event::InitApply(obj) => {
                let kind = obj.kind_id();
                match self.init.get_mut(&(source, kind)) {
                    Some(buf) => {
                        buf.insert(obj.key(), obj);
                    }
                    // InitApply without Init: treat as a plain apply.
                    None => self.apply_object(source, obj),
                }
            }
            Event::InitDone(kind) => {
                let was_synced = self.synced();
                let buf = self.init.remove(&(source, kind)).unwrap_or_default();
                let gone: Vec<ObjRef> = self
                    .keys
                    .range((kind, ObjRef::default())..)
                    .take_while(|((k, _), _)| *k == kind)
                    .filter(|((_, r), s)| **s == source && !buf.contains_key(r))
                    .map(|((_, r), _)| r.clone())
                    .collect();
                if !gone.is_empty() {
                    debug!(
                        %kind,
                        n = gone.len(),
                        "deleting objects missing from the new list"
                    );
                }
                for r in gone {
                    self.delete_key(kind, &r);
                }
                for (_, obj) in buf {
                    self.apply_object(source, obj);
                }
                if let Some(s) = self.sources.get_mut(source) {
                    s.listed.insert(kind);
                }
                self.counters.lists += 1;
                if !was_synced && self.synced() {
                    self.became_synced = true;
                }
            }
            Event::Apply(obj) => self.apply_object(source, obj),
            Event::Delete(obj) => self.delete_key(obj.kind_id(), &obj.key()),
            Event::Generation(g) => {
                if let Some(s) = self.sources.get_mut(source)
                    && s.generation != g
                {
                    s.generation = g;
                    self.generation_changed = true;
                }
            }
        }
    }

    fn apply_object(&mut self, source: SourceId, obj: Object) {
        let kind = obj.kind_id();
        let key = obj.key();
        self.keys.insert((kind, key.clone()), source);
        let model = match to_model(&obj) {
            Ok(m) => {
                self.invalid.remove(&(kind, key.clone()));
                m
            }
            Err(e) => {
                self.counters.invalid += 1;
                warn!(
                    reason = e.metric_label(),
                    "{e}; ignoring this version of the object"
                );
                self.invalid.insert((kind, key), e.to_string());
                return;
            }
        };
        let c = &mut self.cluster;
        match model {
            Model::Service(s) => {
                if c.services.get(&s.id) != Some(&s) {
                    self.changes.services.insert(s.id.clone());
                    c.services.insert(s.id.clone(), s);
                } else {
                    return;
                }
            }
            Model::Slice(s) => {
                if c.slices.get(&s.id) != Some(&s) {
                    self.changes.slices.insert(s.id.clone());
                    c.slices.insert(s.id.clone(), s);
                } else {
                    return;
                }
            }
            Model::Node(n) => {
                if c.nodes.get(&n.name) != Some(&n) {
                    self.changes.nodes.insert(n.name.clone());
                    c.nodes.insert(n.name.clone(), n);
                } else {
                    return;
                }
            }
            Model::Pod(p) => {
                if c.pods.get(&p.id) != Some(&p) {
                    self.changes.pods.insert(p.id.clone());
                    c.pods.insert(p.id.clone(), p);
                } else {
                    return;
                }
            }
            Model::Namespace(n) => {
                if c.namespaces.get(&n.name) != Some(&n) {
                    self.changes.namespaces.insert(n.name.clone());
                    c.namespaces.insert(n.name.clone(), n);
                } else {
                    return;
                }
            }
            Model::Policy(n) => {
                if c.policies.get(&n.id) != Some(&n) {
                    self.changes.policies.insert(n.id.clone());
                    c.policies.insert(n.id.clone(), n);
                } else {
                    return;
                }
            }
        }
        self.changed(kind, key);
    }

    fn delete_key(&mut self, kind: Kind, key: &ObjRef) {
        self.keys.remove(&(kind, key.clone()));
        self.invalid.remove(&(kind, key.clone()));
        if self.delete_model(kind, key) {
            self.changed(kind, key.clone());
        }
    }

    /// Removes the model object; whether there was one.
    fn delete_model(&mut self, kind: Kind, key: &ObjRef) -> bool {
        let c = &mut self.cluster;
        match kind {
            Kind::Service => {
                c.services.remove(key).is_some() && {
                    self.changes.services.insert(key.clone());
                    true
                }
            }
            Kind::EndpointSlice => {
                c.slices.remove(key).is_some() && {
                    self.changes.slices.insert(key.clone());
                    true
                }
            }
            Kind::Node => {
                c.nodes.remove(&key.name).is_some() && {
                    self.changes.nodes.insert(key.name.clone());
                    true
                }
            }
            Kind::Pod => {
                c.pods.remove(key).is_some() && {
                    self.changes.pods.insert(key.clone());
                    true
                }
            }
            Kind::Namespace => {
                c.namespaces.remove(&key.name).is_some() && {
                    self.changes.namespaces.insert(key.name.clone());
                    true
                }
            }
            Kind::NetworkPolicy => {
                c.policies.remove(key).is_some() && {
                    self.changes.policies.insert(key.clone());
                    true
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(yaml: &str) -> Object {
        let (mut objs, errs) = super::super::yaml::parse_documents(yaml, "test");
        assert!(errs.is_empty(), "{errs:?}");
        objs.remove(0)
    }

    fn svc(name: &str, port: u16) -> Object {
        obj(&format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: {port}}}]}}\n"
        ))
    }

    fn ev(source: SourceId, event: Event) -> SourceEvent {
        SourceEvent { source, event }
    }

    fn r(name: &str) -> ObjRef {
        ObjRef::new("shop", name)
    }

    #[test]
    fn initial_list_then_changes_then_a_relist_that_drops_objects() {
        let mut s = Store::new();
        let src = s.register("kube", &[Kind::Service, Kind::Node]);
        assert!(!s.synced());
        s.apply(ev(src, Event::Init(Kind::Service)));
        s.apply(ev(src, Event::InitApply(svc("a", 80))));
        s.apply(ev(src, Event::InitApply(svc("b", 80))));
        // Buffered until InitDone.
        assert!(s.cluster().services.is_empty());
        s.apply(ev(src, Event::InitDone(Kind::Service)));
        assert_eq!(s.cluster().services.len(), 2);
        assert!(!s.synced(), "Nodes not listed yet");
        assert_eq!(s.waiting_for(), ["kube/Node"]);
        s.apply(ev(src, Event::Init(Kind::Node)));
        s.apply(ev(src, Event::InitDone(Kind::Node)));
        assert!(s.synced());
        assert!(s.dirty());
        let ch = s.take_changes();
        assert_eq!(ch.services, [r("a"), r("b")].into());

        // An Apply that changes nothing the model carries is not a change.
        let mut same = svc("a", 80);
        if let Object::Service(o) = &mut same {
            o.metadata.resource_version = Some("99".into());
        }
        s.apply(ev(src, Event::Apply(same)));
        assert!(!s.dirty());
        s.apply(ev(src, Event::Apply(svc("a", 81))));
        assert_eq!(s.take_changes().services, [r("a")].into());

        // The watch broke; b was deleted meanwhile; the re-list drops it.
        s.apply(ev(src, Event::Init(Kind::Service)));
        s.apply(ev(src, Event::InitApply(svc("a", 81))));
        s.apply(ev(src, Event::InitDone(Kind::Service)));
        let ch = s.take_changes();
        assert_eq!(ch.services, [r("b")].into(), "only b changed (deleted)");
        assert_eq!(
            s.cluster().services.keys().cloned().collect::<Vec<_>>(),
            [r("a")]
        );
        assert!(s.synced());
    }

    #[test]
    fn invalid_update_keeps_the_previous_version_and_is_counted() {
        let mut s = Store::new();
        let src = s.register("dir", &[Kind::Service]);
        s.apply(ev(src, Event::Init(Kind::Service)));
        s.apply(ev(src, Event::InitApply(svc("a", 80))));
        s.apply(ev(src, Event::InitDone(Kind::Service)));
        s.take_changes();
        s.apply(ev(
            src,
            Event::Apply(obj(
                "kind: Service\nmetadata: {name: a, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80, protocol: ICMP}]}\n",
            )),
        ));
        assert!(!s.dirty());
        assert_eq!(s.counters.invalid, 1);
        assert_eq!(s.cluster().services[&r("a")].ports[0].port, 80);
        let inv: Vec<&String> = s.invalid().collect();
        assert!(
            inv[0].contains("Service shop/a: unknown protocol"),
            "{inv:?}"
        );
        // Fixing it clears the error.
        s.apply(ev(src, Event::Apply(svc("a", 8080))));
        assert_eq!(s.invalid().count(), 0);
        assert_eq!(s.take_changes().services, [r("a")].into());
    }

    #[test]
    fn every_source_must_list_before_the_store_is_synced() {
        let mut s = Store::new();
        let a = s.register("a", &[Kind::Service]);
        let b = s.register("b", &[Kind::Service]);
        s.apply(ev(a, Event::Init(Kind::Service)));
        s.apply(ev(a, Event::InitDone(Kind::Service)));
        assert!(!s.synced());
        // A re-list of source b does not delete what source a delivered.
        s.apply(ev(a, Event::Apply(svc("x", 80))));
        s.apply(ev(b, Event::Init(Kind::Service)));
        s.apply(ev(b, Event::InitDone(Kind::Service)));
        assert!(s.synced());
        assert_eq!(s.cluster().services.len(), 1);
    }

    #[test]
    fn generation_marks_the_store_dirty_once() {
        let mut s = Store::new();
        let a = s.register("dir", &[]);
        s.apply(ev(a, Event::Generation(3)));
        assert!(s.dirty());
        assert_eq!(s.generation(), 3);
        s.take_changes();
        s.apply(ev(a, Event::Generation(3)));
        assert!(!s.dirty());
    }

    #[test]
    fn slices_and_nodes_and_untracked_kinds() {
        let mut s = Store::new();
        let src = s.register("dir", &Kind::ALL);
        s.apply(ev(
            src,
            Event::Apply(obj(
                "kind: EndpointSlice\nmetadata: {name: a-1, namespace: shop, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n",
            )),
        ));
        s.apply(ev(
            src,
            Event::Apply(obj("kind: Node\nmetadata: {name: n1}\n")),
        ));
        s.apply(ev(
            src,
            Event::Apply(obj("kind: Pod\nmetadata: {name: p, namespace: shop}\n")),
        ));
        let ch = s.take_changes();
        assert_eq!(ch.slices, [r("a-1")].into());
        assert_eq!(ch.nodes, ["n1".to_string()].into());
        assert_eq!(ch.pods, [r("p")].into());
        s.apply(ev(
            src,
            Event::Delete(obj("kind: Node\nmetadata: {name: n1}\n")),
        ));
        assert_eq!(s.take_changes().nodes, ["n1".to_string()].into());
        assert!(s.cluster().nodes.is_empty());
        assert_eq!(s.counts()[&Kind::Pod], 1);
    }
}
