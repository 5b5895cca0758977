//! The directory source: every `*.yaml`, `*.yml` and `*.json` file under a directory
//! (recursively), read as multi-document Kubernetes YAML and turned into a cluster
//! snapshot. [`DirSource::poll`] re-reads when any file's size or mtime changed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use weir_core::model::Cluster;

use super::{
    convert,
    yaml::{self, Object},
};

/// A problem with one object or document; the rest of the snapshot is still used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub message: String,
    /// Metric label: "invalid_yaml" or "invalid_object".
    pub reason: &'static str,
}

pub struct DirSource {
    root: PathBuf,
    stamp: BTreeMap<PathBuf, (u64, SystemTime)>,
}

fn files(root: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            files(&p, out)?;
        } else if matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            stamp: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn stamps(&self) -> std::io::Result<BTreeMap<PathBuf, (u64, SystemTime)>> {
        let mut v = Vec::new();
        if self.root.is_file() {
            v.push(self.root.clone());
        } else {
            files(&self.root, &mut v)?;
        }
        let mut m = BTreeMap::new();
        for p in v {
            if let Ok(md) = std::fs::metadata(&p) {
                m.insert(
                    p,
                    (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
                );
            }
        }
        Ok(m)
    }

    /// Re-reads the directory if anything changed since the last read (always on the
    /// first call). `Ok(None)` means unchanged.
    pub fn poll(&mut self) -> std::io::Result<Option<(Vec<Object>, Vec<SourceError>)>> {
        let stamps = self.stamps()?;
        if !self.stamp.is_empty() && stamps == self.stamp {
            return Ok(None);
        }
        let r = read_objects(stamps.keys())?;
        self.stamp = stamps;
        Ok(Some(r))
    }
}

/// Reads and parses the given files.
pub fn read_objects<'a>(
    paths: impl Iterator<Item = &'a PathBuf>,
) -> std::io::Result<(Vec<Object>, Vec<SourceError>)> {
    let mut objs = Vec::new();
    let mut errs = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p)?;
        let (o, e) = yaml::parse_documents(&text, &p.display().to_string());
        objs.extend(o);
        errs.extend(e.into_iter().map(|e| SourceError {
            message: e.to_string(),
            reason: "invalid_yaml",
        }));
    }
    Ok((objs, errs))
}

/// Builds the model snapshot from objects; objects that fail conversion are skipped and
/// reported.
pub fn to_cluster(objs: &[Object]) -> (Cluster, Vec<SourceError>) {
    let mut c = Cluster::default();
    let mut errs = Vec::new();
    let mut err = |e: convert::ConvertError| {
        errs.push(SourceError {
            message: e.to_string(),
            reason: e.metric_label(),
        })
    };
    for o in objs {
        match o {
            Object::Service(s) => match convert::service(s) {
                Ok(s) => {
                    c.services.insert(s.id.clone(), s);
                }
                Err(e) => err(e),
            },
            Object::EndpointSlice(s) => match convert::endpoint_slice(s) {
                Ok(s) => {
                    c.slices.insert(s.id.clone(), s);
                }
                Err(e) => err(e),
            },
            Object::Node(n) => match convert::node(n) {
                Ok(n) => {
                    c.nodes.insert(n.name.clone(), n);
                }
                Err(e) => err(e),
            },
            Object::Pod(p) => match convert::pod(p) {
                Ok(p) => {
                    c.pods.insert(p.id.clone(), p);
                }
                Err(e) => err(e),
            },
            Object::Namespace(n) => match convert::namespace(n) {
                Ok(n) => {
                    c.namespaces.insert(n.name.clone(), n);
                }
                Err(e) => err(e),
            },
            Object::NetworkPolicy(n) => match convert::network_policy(n) {
                Ok(n) => {
                    c.policies.insert(n.id.clone(), n);
                }
                Err(e) => err(e),
            },
        }
    }
    (c, errs)
}
