//! Golden tests: Service and EndpointSlice YAML in, a readable dump of the map image out
//! (tests/golden/services/<case>.yaml -> <case>.txt), for node-a with the settings of
//! tests/support (pod CIDRs 10.244.0.0/16 and fd00:244::/48, service CIDRs 10.96.0.0/16
//! and fd00:96::/108). `_nodes.yaml` is added to every case.
//!
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo nextest run -E 'binary(golden_services)'`
//! and review the diff: every expected file was checked by hand against the upstream
//! rule its case names.

mod support;

use std::path::{Path, PathBuf};

use weir::source::{dir, yaml};
use weir_core::pipeline::Pipeline;

fn dir_() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/services")
}

fn render(case: &Path) -> String {
    let nodes = std::fs::read_to_string(dir_().join("_nodes.yaml")).unwrap();
    let text = std::fs::read_to_string(case).unwrap();
    let (mut objs, errs) = yaml::parse_documents(&nodes, "_nodes.yaml");
    assert!(errs.is_empty(), "{errs:?}");
    let (o, errs) = yaml::parse_documents(&text, &case.display().to_string());
    assert!(errs.is_empty(), "{errs:?}");
    objs.extend(o);
    let (cluster, errs) = dir::to_cluster(&objs);
    assert!(errs.is_empty(), "{errs:?}");
    let mut p = Pipeline::new(support::settings());
    let (img, errs) = p.desired(&cluster, 1);
    assert!(errs.is_empty(), "{errs:?}");
    img.dump()
}

#[test]
fn golden_service_images() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir_())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && !p.file_name().unwrap().to_string_lossy().starts_with('_')
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 7, "golden cases missing");
    let mut failures = Vec::new();
    for case in cases {
        let got = render(&case);
        let expected_path = case.with_extension("txt");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!(
                "--- {}\n{}",
                expected_path.display(),
                diff(&expected, &got)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatch (UPDATE_GOLDEN=1 to regenerate):\n{}",
        failures.join("\n")
    );
}

fn diff(a: &str, b: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for l in &a {
        if !b.contains(l) {
            out += &format!("-{l}\n");
        }
    }
    for l in &b {
        if !a.contains(l) {
            out += &format!("+{l}\n");
        }
    }
    out
}
