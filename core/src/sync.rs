//! One sync step of the node agent, as pure logic over the [`Datapath`] trait:
//!
//! 1. [`Pipeline::update`] recomputes the Services a [`ChangeSet`] affects and reports the
//!    keys it touched;
//! 2. the plan is the diff of what the maps hold and what is desired, restricted to those
//!    keys (plus keys left over from earlier syncs), so a sync costs what the change
//!    costs; ops come out make-before-break (`plan::diff`);
//! 3. deletions wait until every source has delivered its initial list (before that the
//!    agent cannot know whether a missing object is gone or not listed yet); the keys
//!    are kept and deleted by the first full reconcile after all sources are synced;
//! 4. capacity admission: if the plan would grow a map past its capacity, the Services
//!    whose change adds entries to that map are refused as a whole (their previous image
//!    is put back, so what was programmed for them stays), logged and counted, and
//!    everything else is still programmed; refused Services are retried on every sync.
//!    The check is on the peak: a make-before-break plan writes all new entries before
//!    it deletes anything, so deletions make room only for the next sync (which follows
//!    at once: the report asks for a retry);
//! 5. apply; on a failure the ops before it are applied (each prefix of a plan is a
//!    consistent state) and the rest is retried on the next sync;
//! 6. ids of backends and frontends whose entries are gone from the maps and from the
//!    desired image are released (never while a map entry still carries them).
//!
//! On start the [`Syncer`] adopts what the pinned maps hold: ids are seeded from it, and
//! the first sync diffs everything, so an unchanged cluster writes nothing.

use std::collections::BTreeMap;

use weir_common::maps as names;

use crate::{
    datapath::{ApplyError, Datapath},
    image::MapImage,
    keys::ImageKeys,
    model::{Cluster, ObjRef},
    pipeline::{ChangeSet, NodeSettings, Pipeline, ServiceError},
    plan::{self, Op, Plan},
};

/// A Service whose change did not fit a map; what was programmed for it is kept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "Service {service} refused: map {map} would hold {entries} entries, more than its capacity {capacity}; keeping what was programmed for it"
)]
pub struct Refusal {
    pub service: ObjRef,
    pub map: &'static str,
    pub capacity: u32,
    /// Entries the map would have held at the peak of the plan with every change of
    /// this sync admitted.
    pub entries: usize,
}

impl Refusal {
    pub fn metric_label(&self) -> &'static str {
        "map_capacity"
    }
}

/// Counters of the sync loop, for the metrics endpoint (a prometheus-client registry
/// exports them; see the metrics issue). Monotonic unless marked as a gauge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub syncs: u64,
    pub ops_applied: u64,
    /// Failed applies, by `ApplyError::metric_label`.
    pub apply_errors: BTreeMap<&'static str, u64>,
    /// Services refused because a map was full, by map.
    pub refused: BTreeMap<&'static str, u64>,
    /// Service compile failures (e.g. more backends than slots).
    pub compile_errors: u64,
    /// Gauge: deletions waiting for every source's initial list.
    pub deferred_deletes: u64,
    /// Gauge: Services currently refused.
    pub refused_services: u64,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Ops applied.
    pub ops: usize,
    /// Of those, ops on `BACKENDS` (a backend added, changed or removed): only these can
    /// leave a socket-LB socket connected to a backend that is gone, so the agent's socket
    /// sweep runs after such syncs only.
    pub backend_ops: usize,
    /// Ops planned (more than `ops` when the apply failed).
    pub planned: usize,
    /// Deletions held back until every source has listed.
    pub deferred: usize,
    /// Keys diffed.
    pub touched: usize,
    /// Services translated and compiled.
    pub translations: u64,
    /// The sync diffed every key (first sync, first sync after every source listed).
    pub full: bool,
    pub errors: Vec<ServiceError>,
    /// Services refused for capacity in this sync (not already refused before).
    pub refused: Vec<Refusal>,
    /// Services refused before and programmed now.
    pub admitted: Vec<ObjRef>,
    pub apply_error: Option<ApplyError>,
    /// Another sync should follow soon even without changes (the apply failed, or
    /// entries were deleted while some Service waits for room).
    pub retry: bool,
}

/// Input of one sync.
pub struct SyncInput<'a> {
    pub cluster: &'a Cluster,
    pub changes: &'a ChangeSet,
    /// Every source has delivered its initial list: deletions are allowed.
    pub sources_synced: bool,
    /// The input generation to record in CONFIG.
    pub generation: u64,
}

pub struct Syncer {
    pipeline: Pipeline,
    /// What the maps hold (as far as the applied ops tell).
    current: MapImage,
    capacities: BTreeMap<&'static str, u32>,
    /// Keys that may differ between `current` and the desired image and were not in the
    /// last plan (deferred deletions, ops after a failed one).
    pending: ImageKeys,
    deletes_allowed: bool,
    full_next: bool,
    first: bool,
    refused: BTreeMap<ObjRef, Refusal>,
    pub counters: Counters,
}

fn is_delete(op: &Op) -> bool {
    !op.is_put()
}

/// Keys of `img` in the map named `map` that `cur` lacks.
fn new_keys_in(img: &MapImage, cur: &MapImage, map: &str) -> usize {
    fn n<K: Ord, V>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
        a.keys().filter(|k| !b.contains_key(k)).count()
    }
    match map {
        names::SERVICES => n(&img.services, &cur.services),
        names::BACKENDS => n(&img.backends, &cur.backends),
        names::REV_NAT => n(&img.rev_nat, &cur.rev_nat),
        names::SOURCE_RANGES => n(&img.source_ranges, &cur.source_ranges),
        names::MAGLEV => n(&img.maglev, &cur.maglev),
        names::AFFINITY_SETS => n(&img.affinity_sets, &cur.affinity_sets),
        names::IPCACHE => n(&img.policy.ipcache, &cur.policy.ipcache),
        names::ENDPOINTS => n(&img.policy.endpoints, &cur.policy.endpoints),
        names::POLICY => n(&img.policy.policy, &cur.policy.policy),
        names::POLICY_RULES => n(&img.policy.rules, &cur.policy.rules),
        _ => 0,
    }
}

impl Syncer {
    /// A syncer for maps that hold `adopted` (empty on a fresh node; the pinned maps'
    /// contents after a restart). `capacities` are the maps' sizes
    /// (`Datapath::capacities`).
    pub fn new(
        settings: NodeSettings,
        adopted: MapImage,
        capacities: BTreeMap<&'static str, u32>,
    ) -> Syncer {
        let mut pipeline = Pipeline::new(settings);
        pipeline.ids.seed_from(&adopted);
        pipeline.policy.seed_from(&adopted.policy);
        Syncer {
            pipeline,
            current: adopted,
            capacities,
            pending: ImageKeys::default(),
            deletes_allowed: false,
            full_next: true,
            first: true,
            refused: BTreeMap::new(),
            counters: Counters::default(),
        }
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// What the maps hold.
    pub fn current(&self) -> &MapImage {
        &self.current
    }

    /// What the maps should hold.
    pub fn desired(&self) -> &MapImage {
        self.pipeline.image()
    }

    /// Services currently refused for capacity.
    pub fn refused(&self) -> impl Iterator<Item = &Refusal> {
        self.refused.values()
    }

    /// Whether deletions are allowed (every source has listed once).
    pub fn deletes_allowed(&self) -> bool {
        self.deletes_allowed
    }

    /// One sync step; see the module documentation.
    pub fn sync<D: Datapath + ?Sized>(&mut self, input: SyncInput<'_>, dp: &mut D) -> SyncReport {
        self.counters.syncs += 1;
        let mut report = SyncReport::default();
        let translations_before = self.pipeline.stats.translations;

        let mut changes = input.changes.clone();
        changes.all |= std::mem::take(&mut self.first);
        changes.services.extend(self.refused.keys().cloned());
        let upd = self
            .pipeline
            .update(input.cluster, &changes, input.generation);
        self.counters.compile_errors += upd.errors.len() as u64;
        report.errors = upd.errors;
        let mut keys = upd.touched;
        keys.extend(&std::mem::take(&mut self.pending));
        if input.sources_synced && !self.deletes_allowed {
            self.deletes_allowed = true;
            self.full_next = true;
        }
        let full = std::mem::take(&mut self.full_next);
        if full {
            keys.extend_from_image(&self.current);
            keys.extend_from_image(self.pipeline.image());
        }
        report.full = full;

        // A refused Service whose image is now what it had (reverted, or no longer
        // compiled to anything new) is not waiting for room any more.
        let replaced: BTreeMap<ObjRef, MapImage> = upd.replaced.into_iter().collect();
        let errored: std::collections::BTreeSet<&ObjRef> =
            report.errors.iter().map(|e| &e.service).collect();
        self.refused
            .retain(|s, _| replaced.contains_key(s) || errored.contains(s));

        let (plan, deferred) = self.admit(replaced, &mut keys, &mut report);

        report.planned = plan.len();
        report.deferred = deferred.len();
        report.touched = keys.len();
        let out = dp.apply(&plan);
        Plan {
            ops: plan.ops[..out.applied].to_vec(),
        }
        .apply_to(&mut self.current);
        self.counters.ops_applied += out.applied as u64;
        report.ops = out.applied;
        report.backend_ops = plan.ops[..out.applied]
            .iter()
            .filter(|o| o.map_name() == weir_common::maps::BACKENDS)
            .count();
        self.pending = deferred;
        if let Some(e) = out.error {
            self.pending.extend(&ImageKeys::of_plan(&Plan {
                ops: plan.ops[out.applied..].to_vec(),
            }));
            *self
                .counters
                .apply_errors
                .entry(e.metric_label())
                .or_default() += 1;
            report.apply_error = Some(e);
            report.retry = true;
        }
        let deleted = plan.ops[..out.applied].iter().any(is_delete);
        if deleted && !self.refused.is_empty() {
            report.retry = true;
        }

        self.release_ids(&keys);
        if full && self.deletes_allowed {
            // Ids allocated by compiles that failed half-way belong to no entry; a full
            // sync is O(cluster) anyway, so sweep them here.
            let mut ids = std::mem::take(&mut self.pipeline.ids);
            let (desired, current) = (self.pipeline.image(), &self.current);
            ids.retain_where(
                |id| desired.backends.contains_key(&id) || current.backends.contains_key(&id),
                |id| desired.rev_nat.contains_key(&id) || current.rev_nat.contains_key(&id),
            );
            self.pipeline.ids = ids;
        }
        self.counters.deferred_deletes = report.deferred as u64;
        self.counters.refused_services = self.refused.len() as u64;
        report.translations = self.pipeline.stats.translations - translations_before;
        report
    }

    /// The plan for `keys`, with deletions held back (and returned as keys) while not
    /// every source has listed.
    fn plan_for(&self, keys: &ImageKeys) -> (Plan, ImageKeys) {
        let mut plan = plan::diff(
            &self.current.subset(keys),
            &self.pipeline.image().subset(keys),
        );
        let mut deferred = ImageKeys::default();
        if !self.deletes_allowed {
            plan.ops.retain(|op| {
                if is_delete(op) {
                    deferred.insert_op(op);
                    false
                } else {
                    true
                }
            });
        }
        (plan, deferred)
    }

    /// Maps the plan would grow past their capacity: (map, peak entries, capacity).
    /// A make-before-break plan writes every new entry before it deletes anything, so
    /// the peak is what the maps hold plus the new keys; deletions make room for the
    /// next sync (which the report asks for).
    fn overflow(&self, plan: &Plan) -> Vec<(&'static str, usize, u32)> {
        let mut counts: BTreeMap<&'static str, usize> = self.current.counts();
        for op in &plan.ops {
            if matches!(op, Op::PutConfig(_)) || is_delete(op) {
                continue;
            }
            if !self.current.has_key_of(op) {
                *counts.entry(op.map_name()).or_default() += 1;
            }
        }
        self.capacities
            .iter()
            .filter_map(|(map, cap)| {
                let n = counts.get(map).copied().unwrap_or(0);
                (n > *cap as usize).then_some((*map, n, *cap))
            })
            .collect()
    }

    /// Capacity admission (see the module documentation). Refuses, in reverse
    /// namespace/name order, the changed Services that add entries to an overflowing map
    /// until the excess is covered, and plans again.
    fn admit(
        &mut self,
        mut replaced: BTreeMap<ObjRef, MapImage>,
        keys: &mut ImageKeys,
        report: &mut SyncReport,
    ) -> (Plan, ImageKeys) {
        loop {
            let (plan, deferred) = self.plan_for(keys);
            let over = self.overflow(&plan);
            if over.is_empty() {
                for s in replaced.keys() {
                    if self.refused.remove(s).is_some() {
                        report.admitted.push(s.clone());
                    }
                }
                return (plan, deferred);
            }
            let mut progress = false;
            for (map, entries, capacity) in over {
                let mut excess = entries as i64 - capacity as i64;
                let candidates: Vec<ObjRef> = replaced.keys().rev().cloned().collect();
                for svc in candidates {
                    if excess <= 0 {
                        break;
                    }
                    let adds = self
                        .pipeline
                        .service_image(&svc)
                        .map(|img| new_keys_in(img, &self.current, map))
                        .unwrap_or(0);
                    if adds == 0 {
                        continue;
                    }
                    let old = replaced.remove(&svc).expect("candidate is replaced");
                    self.pipeline.restore(&svc, old, keys);
                    excess -= adds as i64;
                    progress = true;
                    let r = Refusal {
                        service: svc.clone(),
                        map,
                        capacity,
                        entries,
                    };
                    if self.refused.insert(svc, r.clone()).is_none() {
                        *self.counters.refused.entry(map).or_default() += 1;
                        report.refused.push(r);
                    }
                }
            }
            if !progress {
                // Nothing a Service added can be refused (e.g. a map that is already
                // over capacity, or node entries): apply and let the datapath report
                // the full map.
                return (plan, deferred);
            }
        }
    }

    /// Releases the ids of backends and frontends among `keys` that neither the maps
    /// nor the desired image hold any more.
    fn release_ids(&mut self, keys: &ImageKeys) {
        for id in &keys.backends {
            if !self.pipeline.image().backends.contains_key(id)
                && !self.current.backends.contains_key(id)
            {
                self.pipeline.ids.release_backend_id(*id);
            }
        }
        for id in &keys.rev_nat {
            if !self.pipeline.image().rev_nat.contains_key(id)
                && !self.current.rev_nat.contains_key(id)
            {
                self.pipeline.ids.release_frontend_id(*id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use weir_common::lb::{SCOPE_CLUSTER, SCOPE_LOCAL, SVC_F_VIP_MARKER};

    use super::*;
    use crate::{
        datapath::{FakeDatapath, FaultyDatapath},
        model::*,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn settings() -> NodeSettings {
        NodeSettings {
            node_name: "n1".into(),
            ..Default::default()
        }
    }

    /// Adds Service `default/<name>` at `vip`:80 with ready backends `addrs`:8080.
    fn add(c: &mut Cluster, name: &str, vip: &str, addrs: &[&str]) -> ChangeSet {
        let id = ObjRef::new("default", name);
        c.services.insert(
            id.clone(),
            Service {
                id: id.clone(),
                cluster_ips: vec![ip(vip)],
                ports: vec![ServicePort {
                    name: "http".into(),
                    protocol: Protocol::TCP,
                    port: 80,
                    node_port: 0,
                }],
                ..Default::default()
            },
        );
        let sid = ObjRef::new("default", format!("{name}-x"));
        c.slices.insert(
            sid.clone(),
            EndpointSlice {
                id: sid.clone(),
                trigger_time_unix_ns: None,
                service: Some(name.into()),
                address_type: AddressType::IPv4,
                ports: vec![EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::TCP,
                    port: 8080,
                }],
                endpoints: addrs
                    .iter()
                    .map(|a| Endpoint {
                        addresses: vec![ip(a)],
                        node_name: Some("n2".into()),
                        ..Default::default()
                    })
                    .collect(),
            },
        );
        ChangeSet {
            services: [id].into(),
            slices: [sid].into(),
            ..Default::default()
        }
    }

    fn remove(c: &mut Cluster, name: &str) -> ChangeSet {
        let id = ObjRef::new("default", name);
        let sid = ObjRef::new("default", format!("{name}-x"));
        c.services.remove(&id);
        c.slices.remove(&sid);
        ChangeSet {
            services: [id].into(),
            slices: [sid].into(),
            ..Default::default()
        }
    }

    fn sync(
        s: &mut Syncer,
        c: &Cluster,
        ch: &ChangeSet,
        synced: bool,
        dp: &mut impl Datapath,
    ) -> SyncReport {
        s.sync(
            SyncInput {
                cluster: c,
                changes: ch,
                sources_synced: synced,
                generation: 1,
            },
            dp,
        )
    }

    /// The invariants a packet relies on at every moment: a master's slots exist, every
    /// slot names an existing backend, every master's rev-NAT entry exists.
    fn assert_consistent(img: &MapImage, after: &str) {
        for (k, v) in img.services.iter().filter(|(k, _)| k.slot == 0) {
            if v.flags & SVC_F_VIP_MARKER != 0 {
                continue;
            }
            assert!(
                img.rev_nat.contains_key(&v.rev_nat_id),
                "{after}: master {k:?} names missing rev-NAT {}",
                v.rev_nat_id
            );
            for (scope, n) in [(SCOPE_CLUSTER, v.count), (SCOPE_LOCAL, v.local_count)] {
                for slot in 1..=n {
                    let sk = weir_common::lb::ServiceKey { scope, slot, ..*k };
                    let sv = img
                        .services
                        .get(&sk)
                        .unwrap_or_else(|| panic!("{after}: slot {slot} of {k:?} missing"));
                    assert!(
                        img.backends.contains_key(&sv.backend_id),
                        "{after}: slot {slot} of {k:?} names missing backend {}",
                        sv.backend_id
                    );
                }
            }
        }
    }

    /// Replays the fake's op log one op at a time, checking the invariants after each.
    fn assert_every_step_consistent(log: &[Op]) {
        let mut img = MapImage::default();
        for (i, op) in log.iter().enumerate() {
            Plan {
                ops: vec![op.clone()],
            }
            .apply_to(&mut img);
            assert_consistent(&img, &format!("op {i} {op:?}"));
        }
    }

    #[test]
    fn the_report_counts_backend_ops_apart_from_the_others() {
        let mut c = Cluster::default();
        add(&mut c, "s1", "10.96.0.1", &["10.0.0.1", "10.0.0.2"]);
        let mut fake = FakeDatapath::default();
        let mut s = Syncer::new(settings(), MapImage::default(), fake.capacities());
        let r = sync(&mut s, &c, &ChangeSet::everything(), true, &mut fake);
        assert_eq!(r.backend_ops, 2, "two backends written");
        assert!(r.ops > r.backend_ops);

        // A NetworkPolicy isolating a local pod writes policy maps only.
        let pod = ObjRef::new("default", "p");
        c.pods.insert(
            pod.clone(),
            Pod {
                id: pod.clone(),
                labels: [("app".to_string(), "p".to_string())].into(),
                node_name: Some("n1".into()),
                ips: vec![ip("10.0.9.9")],
                ..Default::default()
            },
        );
        let pol = ObjRef::new("default", "deny");
        c.policies.insert(
            pol.clone(),
            NetworkPolicy {
                id: pol.clone(),
                policy_types: PolicyTypes {
                    ingress: true,
                    egress: false,
                },
                ..Default::default()
            },
        );
        let ch = ChangeSet {
            pods: [pod].into(),
            policies: [pol].into(),
            ..Default::default()
        };
        let r = sync(&mut s, &c, &ch, true, &mut fake);
        assert!(r.ops > 0, "the policy is programmed");
        assert_eq!(r.backend_ops, 0);

        // An endpoint removed: its backend goes.
        let ch = add(&mut c, "s1", "10.96.0.1", &["10.0.0.1"]);
        let r = sync(&mut s, &c, &ch, true, &mut fake);
        assert!(r.backend_ops >= 1, "{:?}", fake.log);
    }

    #[test]
    fn restart_with_unchanged_input_applies_zero_ops() {
        let mut c = Cluster::default();
        for i in 0..20 {
            add(
                &mut c,
                &format!("s{i}"),
                &format!("10.96.0.{}", i + 1),
                &[&format!("10.0.{i}.1"), &format!("10.0.{i}.2")],
            );
        }
        let mut fake = FakeDatapath::default();
        let mut s = Syncer::new(settings(), MapImage::default(), fake.capacities());
        let r = sync(&mut s, &c, &ChangeSet::everything(), true, &mut fake);
        assert!(r.ops > 0 && r.apply_error.is_none());
        let programmed = fake.image.clone();
        let log_len = fake.log.len();

        // The agent restarts: a new syncer adopts what the maps hold.
        let mut s2 = Syncer::new(settings(), fake.read_image().unwrap(), fake.capacities());
        let r = sync(&mut s2, &c, &ChangeSet::everything(), true, &mut fake);
        assert_eq!(r.ops, 0, "a restart with unchanged input writes nothing");
        assert_eq!(fake.log.len(), log_len);
        assert_eq!(fake.image, programmed);
        // And the restored ids keep working: a change after the restart reuses them.
        let ch = add(
            &mut c,
            "s3",
            "10.96.0.4",
            &["10.0.3.1", "10.0.3.2", "10.0.3.9"],
        );
        let r = sync(&mut s2, &c, &ch, true, &mut fake);
        assert_eq!(r.translations, 1);
        // One new backend, its slot, the master: no existing id moved.
        assert_eq!(r.ops, 3, "{:?}", &fake.log[log_len..]);
        assert_every_step_consistent(&fake.log);
    }

    #[test]
    fn nothing_is_deleted_before_every_source_has_listed() {
        // The maps hold a Service the new agent has not (yet) seen.
        let mut c = Cluster::default();
        add(&mut c, "old", "10.96.0.1", &["10.0.0.1"]);
        let mut fake = FakeDatapath::default();
        let mut s = Syncer::new(settings(), MapImage::default(), fake.capacities());
        sync(&mut s, &c, &ChangeSet::everything(), true, &mut fake);
        let old_entries = fake.image.services.len();

        let mut c = Cluster::default();
        let ch = add(&mut c, "new", "10.96.0.2", &["10.0.0.2"]);
        let mut s = Syncer::new(settings(), fake.read_image().unwrap(), fake.capacities());
        let r = sync(&mut s, &c, &ch, false, &mut fake);
        assert!(r.deferred > 0);
        assert_eq!(
            fake.image.services.len(),
            old_entries * 2,
            "the new Service is added, the old one kept"
        );
        assert_eq!(s.counters.deferred_deletes as usize, r.deferred);
        // More changes before the sources are synced still delete nothing.
        let ch = add(&mut c, "new2", "10.96.0.3", &["10.0.0.3"]);
        let r = sync(&mut s, &c, &ch, false, &mut fake);
        assert!(r.deferred > 0);
        assert_eq!(fake.image.services.len(), old_entries * 3);
        // Once every source has listed, the old Service goes.
        let r = sync(&mut s, &c, &ChangeSet::default(), true, &mut fake);
        assert!(r.full);
        assert_eq!(r.deferred, 0);
        assert_eq!(fake.image.services.len(), old_entries * 2);
        assert_eq!(fake.image, *s.desired());
        assert_every_step_consistent(&fake.log);
    }

    #[test]
    fn a_change_that_overflows_a_map_is_refused_as_a_whole_and_the_rest_programmed() {
        // Each Service with n backends needs 2 + n SERVICES entries (master, VIP marker,
        // n slots).
        let mut fake = FakeDatapath::with_capacities(&[(names::SERVICES, 10)]);
        let mut c = Cluster::default();
        let mut ch = add(&mut c, "a", "10.96.0.1", &["10.0.0.1"]);
        ch.extend(add(&mut c, "b", "10.96.0.2", &["10.0.0.2"]));
        ch.extend(add(&mut c, "c", "10.96.0.3", &["10.0.0.3"]));
        ch.extend(add(&mut c, "d", "10.96.0.4", &["10.0.0.4"]));
        let mut s = Syncer::new(settings(), MapImage::default(), fake.capacities());
        let r = sync(&mut s, &c, &ch, true, &mut fake);
        assert!(r.apply_error.is_none(), "{:?}", r.apply_error);
        assert_eq!(r.refused.len(), 1, "{:?}", r.refused);
        assert_eq!(r.refused[0].service, ObjRef::new("default", "d"));
        assert_eq!(r.refused[0].map, names::SERVICES);
        assert!(
            r.refused[0]
                .to_string()
                .contains("Service default/d refused: map SERVICES"),
            "{}",
            r.refused[0]
        );
        assert_eq!(fake.image.services.len(), 9);
        assert_eq!(s.counters.refused[names::SERVICES], 1);

        // Growing a programmed Service past the capacity keeps its previous state.
        let before = fake.image.clone();
        let ch = add(
            &mut c,
            "a",
            "10.96.0.1",
            &["10.0.0.1", "10.0.0.11", "10.0.0.12"],
        );
        let r = sync(&mut s, &c, &ch, true, &mut fake);
        assert_eq!(r.refused.len(), 1);
        assert_eq!(r.refused[0].service, ObjRef::new("default", "a"));
        assert_eq!(fake.image, before, "what was programmed for a is intact");
        assert_eq!(s.counters.refused[names::SERVICES], 2);
        assert_eq!(s.counters.refused_services, 2);
        // Retrying does not count again.
        let r = sync(&mut s, &c, &ChangeSet::default(), true, &mut fake);
        assert!(r.refused.is_empty());
        assert_eq!(s.counters.refused[names::SERVICES], 2);

        // Deleting c makes room, but only once its entries are gone: the plan writes
        // new entries before it deletes old ones, so both waiting Services are refused
        // again and a retry is asked for.
        let ch = remove(&mut c, "c");
        let r = sync(&mut s, &c, &ch, true, &mut fake);
        assert!(r.admitted.is_empty());
        assert!(r.retry);
        assert!(fake.image.services.len() <= 10);
        // The retry admits a (first in name order, 2 more entries); d (3) still waits.
        let r = sync(&mut s, &c, &ChangeSet::default(), true, &mut fake);
        assert_eq!(r.admitted, vec![ObjRef::new("default", "a")]);
        assert_eq!(
            s.refused()
                .map(|r| r.service.name.as_str())
                .collect::<Vec<_>>(),
            ["d"]
        );
        // Deleting b makes room for d on the retry after it.
        let ch = remove(&mut c, "b");
        let r = sync(&mut s, &c, &ch, true, &mut fake);
        assert!(r.retry);
        let r = sync(&mut s, &c, &ChangeSet::default(), true, &mut fake);
        assert_eq!(r.admitted, vec![ObjRef::new("default", "d")]);
        assert_eq!(s.refused().count(), 0);
        assert_eq!(fake.image, *s.desired());
        assert!(fake.image.services.len() <= 10);
        assert_every_step_consistent(&fake.log);
        // The ids of the refused and removed backends were released.
        assert_eq!(s.pipeline().ids.allocated().0, fake.image.backends.len());
    }

    #[test]
    fn a_failed_apply_is_retried_and_converges() {
        let mut c = Cluster::default();
        let mut ch = ChangeSet::default();
        for i in 0..5 {
            ch.extend(add(
                &mut c,
                &format!("s{i}"),
                &format!("10.96.0.{}", i + 1),
                &[&format!("10.0.{i}.1")],
            ));
        }
        let mut dp = FaultyDatapath::new(FakeDatapath::default(), 7);
        let mut s = Syncer::new(settings(), MapImage::default(), dp.capacities());
        let r = sync(&mut s, &c, &ch, true, &mut dp);
        assert_eq!(r.ops, 7);
        assert!(r.apply_error.is_some() && r.retry);
        assert_eq!(s.counters.apply_errors["map_write"], 1);
        assert_eq!(dp.inner.image, *s.current());
        let r = sync(&mut s, &c, &ChangeSet::default(), true, &mut dp);
        assert!(r.apply_error.is_none());
        assert_eq!(dp.inner.image, *s.desired());
        assert_every_step_consistent(&dp.inner.log);
    }

    #[test]
    fn churn_keeps_every_intermediate_state_consistent_and_ids_bounded() {
        let mut c = Cluster::default();
        let mut fake = FakeDatapath::default();
        let mut s = Syncer::new(settings(), MapImage::default(), fake.capacities());
        for round in 0..30u32 {
            let name = format!("s{}", round % 7);
            let n = (round % 4) as usize;
            let addrs: Vec<String> = (0..n)
                .map(|j| format!("10.0.{}.{}", round % 5, j + 1))
                .collect();
            let addrs: Vec<&str> = addrs.iter().map(|a| a.as_str()).collect();
            let ch = if round % 5 == 4 {
                remove(&mut c, &name)
            } else {
                add(&mut c, &name, &format!("10.96.0.{}", round % 7 + 1), &addrs)
            };
            let r = sync(&mut s, &c, &ch, true, &mut fake);
            assert!(r.apply_error.is_none());
            assert_eq!(fake.image, *s.desired(), "round {round}");
        }
        assert_every_step_consistent(&fake.log);
        let (b, f) = s.pipeline().ids.allocated();
        assert_eq!(b, fake.image.backends.len());
        assert_eq!(f, fake.image.rev_nat.len());
    }
}
