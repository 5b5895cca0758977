//! The NetworkPolicy maps in the kernel: every case of tests/data/policy is compiled per
//! node, written into the real pinned maps through the agent's map writer (a diff from
//! what the previous case left, so plans of every kind run against real maps), read back,
//! and then the datapath's lookup sequence is run against the kernel's own maps (the
//! kernel does the longest-prefix matching of `IPCACHE` and `POLICY`), for every pair of
//! addresses, protocol and port of the scenario, and compared with the evaluator. This
//! checks the key layout, byte order and prefix lengths against the kernel's LPM trie,
//! which the in-memory model of the lookups cannot. The per-packet eBPF side of policy
//! comes with the datapath part of the issue; these maps are what it will read.

mod support;

use support::{policy::*, require_root};
use weir::{datapath::AyaDatapath, testing::prog::ProgHarness};
use weir_common::{
    Addr,
    policy::{EndpointValue, IpcacheValue, PolicyKey, PolicyValue},
};
use weir_core::{image::MapImage, policy::lookup::PolicyMaps};

/// The three lookups, answered by the kernel.
struct Kernel<'a>(&'a AyaDatapath);

impl PolicyMaps for Kernel<'_> {
    fn endpoint(&self, a: &Addr) -> Option<EndpointValue> {
        self.0.endpoint_lookup(a).expect("ENDPOINTS lookup")
    }
    fn ipcache(&self, a: &Addr) -> Option<IpcacheValue> {
        self.0.ipcache_lookup(a).expect("IPCACHE lookup")
    }
    fn policy(&self, k: &PolicyKey) -> Option<PolicyValue> {
        self.0.policy_lookup(k).expect("POLICY lookup")
    }
}

#[test]
fn kernel_lpm_maps_give_the_evaluators_decisions_for_every_case() {
    require_root();
    let mut h = ProgHarness::new().expect("load datapath");
    let mut decisions = 0;
    for case in cases() {
        let c = cluster(&case);
        for (node, compiled) in compile(&c) {
            let img = MapImage {
                policy: compiled.image.clone(),
                ..Default::default()
            };
            h.program(&img).expect("program policy maps");
            let back = weir_core::datapath::Datapath::read_image(&h.dp).expect("read back");
            assert_eq!(
                back.policy,
                compiled.image,
                "{}: {node}: read back",
                case.display()
            );
            decisions += check_node(&c, node, &Kernel(&h.dp))
                .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        }
    }
    // Every rule id was (re)assigned through the writer, which zeroes its counters.
    assert!(h.dp.policy_counters().unwrap().is_empty());
    assert!(decisions > 100_000, "only {decisions} decisions checked");
}

#[test]
fn emptying_the_policy_maps_leaves_nothing_behind() {
    require_root();
    let mut h = ProgHarness::new().expect("load datapath");
    let case = cases()
        .into_iter()
        .find(|c| c.ends_with("e1-named-port-per-pod.yaml"))
        .unwrap();
    let c = cluster(&case);
    let img = MapImage {
        policy: compile(&c)["node-1"].image.clone(),
        ..Default::default()
    };
    h.program(&img).unwrap();
    h.program(&MapImage::default()).unwrap();
    let back = weir_core::datapath::Datapath::read_image(&h.dp).unwrap();
    assert!(back.policy.is_empty(), "{:?}", back.policy);
}
