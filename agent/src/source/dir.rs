//! The directory source: every `*.yaml`, `*.yml` and `*.json` file under a directory
//! (recursively), read as multi-document Kubernetes YAML.
//!
//! [`DirSource::poll`] re-reads only the files whose size, mtime or inode changed, and
//! turns the difference into [`Event`]s: the first poll is a full listing of every kind
//! (`Init`, `InitApply`..., `InitDone`), later polls yield `Apply`/`Delete` for exactly
//! the objects that changed, so one edited file costs what its changed objects cost.
//! When two files define the same object, the file whose path sorts last wins.
//!
//! The input generation (the number in `.weir-generation`, see
//! `crate::agent::GENERATION_FILE`) is read *before* the objects: a writer writes the
//! objects first and the generation last, so the generation reported after a poll never
//! claims objects the poll did not see.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::SystemTime,
};

use weir_core::model::{Cluster, ObjRef};

use super::{
    Event, Kind, convert,
    yaml::{self, Object},
};

/// A problem with one object or document; the rest of the snapshot is still used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub message: String,
    /// Metric label: "invalid_yaml" or "invalid_object".
    pub reason: &'static str,
}

/// Name of the file in a directory source whose number the agent reports as the input
/// generation it has programmed (CONFIG.generation), so that `weir lab` can wait for it.
pub const GENERATION_FILE: &str = ".weir-generation";

/// What identifies a file's version between polls.
type Stamp = (u64, SystemTime, u64);

pub struct DirSource {
    root: PathBuf,
    stamps: BTreeMap<PathBuf, Stamp>,
    /// Objects of each file as last read.
    files: BTreeMap<PathBuf, Vec<Object>>,
    /// Files defining each object.
    defined_in: BTreeMap<(Kind, ObjRef), BTreeSet<PathBuf>>,
    /// What the events so far said (the object each key has now).
    effective: BTreeMap<(Kind, ObjRef), Object>,
    generation: Option<u64>,
    listed: bool,
}

/// The result of one poll.
#[derive(Debug, Default)]
pub struct Poll {
    pub events: Vec<Event>,
    pub errors: Vec<SourceError>,
    /// Files re-read.
    pub files_read: usize,
}

/// The YAML files under `root`. Entries whose name starts with a dot are skipped: a
/// ConfigMap volume keeps its real files in `..<timestamp>/` directories behind a
/// `..data` symlink and exposes them as `name -> ..data/name` symlinks (which are
/// followed), so reading the hidden directories too would see every object twice.
fn files(root: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(root)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
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

/// The generation number in `dir/.weir-generation` (0 when absent or unreadable).
pub fn read_generation(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(GENERATION_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            stamps: BTreeMap::new(),
            files: BTreeMap::new(),
            defined_in: BTreeMap::new(),
            effective: BTreeMap::new(),
            generation: None,
            listed: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn stamps(&self) -> std::io::Result<BTreeMap<PathBuf, Stamp>> {
        use std::os::unix::fs::MetadataExt as _;
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
                    (
                        md.len(),
                        md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        md.ino(),
                    ),
                );
            }
        }
        Ok(m)
    }

    /// Reads what changed since the last poll. An error (the directory is unreadable)
    /// changes nothing: what was read before stays in force.
    pub fn poll(&mut self) -> std::io::Result<Poll> {
        let root_dir = if self.root.is_file() {
            self.root
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        } else {
            self.root.clone()
        };
        let generation = read_generation(&root_dir);
        let stamps = self.stamps()?;
        let mut out = Poll::default();
        let changed: Vec<PathBuf> = stamps
            .iter()
            .filter(|(p, st)| self.stamps.get(*p) != Some(st))
            .map(|(p, _)| p.clone())
            .collect();
        let removed: Vec<PathBuf> = self
            .stamps
            .keys()
            .filter(|p| !stamps.contains_key(*p))
            .cloned()
            .collect();

        let mut affected: BTreeSet<(Kind, ObjRef)> = BTreeSet::new();
        for p in &removed {
            for o in self.files.remove(p).unwrap_or_default() {
                let k = (o.kind_id(), o.key());
                if let Some(set) = self.defined_in.get_mut(&k) {
                    set.remove(p);
                }
                affected.insert(k);
            }
            self.stamps.remove(p);
        }
        for p in &changed {
            let text = match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) => {
                    // Vanished or unreadable between listing and reading: keep what it
                    // said before and try again next poll.
                    out.errors.push(SourceError {
                        message: format!("{}: {e}", p.display()),
                        reason: "invalid_yaml",
                    });
                    continue;
                }
            };
            out.files_read += 1;
            let (objs, errs) = yaml::parse_documents(&text, &p.display().to_string());
            out.errors.extend(errs.into_iter().map(|e| SourceError {
                message: e.to_string(),
                reason: "invalid_yaml",
            }));
            for o in self.files.remove(p).unwrap_or_default() {
                let k = (o.kind_id(), o.key());
                if let Some(set) = self.defined_in.get_mut(&k) {
                    set.remove(p);
                }
                affected.insert(k);
            }
            for o in &objs {
                let k = (o.kind_id(), o.key());
                self.defined_in
                    .entry(k.clone())
                    .or_default()
                    .insert(p.clone());
                affected.insert(k);
            }
            self.files.insert(p.clone(), objs);
            self.stamps.insert(p.clone(), stamps[p]);
        }

        // The object each affected key has now: from the last file (in path order)
        // that defines it.
        let mut now: BTreeMap<(Kind, ObjRef), Option<Object>> = BTreeMap::new();
        // Per file, each key's last document: built once per poll, so finding the
        // objects of N affected keys is not N scans of the file (quadratic: a file of
        // 50k Services took minutes).
        let mut last_doc: BTreeMap<PathBuf, BTreeMap<(Kind, ObjRef), usize>> = BTreeMap::new();
        for k in affected {
            let files = self.defined_in.get(&k).filter(|s| !s.is_empty());
            let obj = files.and_then(|set| {
                if set.len() > 1 {
                    out.errors.push(SourceError {
                        message: format!(
                            "{} {} is defined in {} files; using {}",
                            k.0,
                            k.1,
                            set.len(),
                            set.last()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default()
                        ),
                        reason: "invalid_object",
                    });
                }
                let p = set.last()?;
                let objs = self.files.get(p)?;
                let index = last_doc.entry(p.clone()).or_insert_with(|| {
                    // Later documents overwrite earlier ones: the last definition wins.
                    objs.iter()
                        .enumerate()
                        .map(|(i, o)| ((o.kind_id(), o.key()), i))
                        .collect()
                });
                index.get(&k).map(|i| objs[*i].clone())
            });
            if obj.is_none() {
                self.defined_in.remove(&k);
            }
            now.insert(k, obj);
        }

        if !self.listed {
            for (k, o) in now {
                if let Some(o) = o {
                    self.effective.insert(k, o);
                }
            }
            out.events.extend(Kind::ALL.iter().map(|k| Event::Init(*k)));
            out.events
                .extend(self.effective.values().cloned().map(Event::InitApply));
            out.events
                .extend(Kind::ALL.iter().map(|k| Event::InitDone(*k)));
            self.listed = true;
        } else {
            for (k, o) in now {
                match o {
                    Some(o) => {
                        if self.effective.get(&k) != Some(&o) {
                            self.effective.insert(k, o.clone());
                            out.events.push(Event::Apply(o));
                        }
                    }
                    None => {
                        if let Some(old) = self.effective.remove(&k) {
                            out.events.push(Event::Delete(old));
                        }
                    }
                }
            }
        }
        if self.generation != Some(generation) {
            self.generation = Some(generation);
            out.events.push(Event::Generation(generation));
        }
        Ok(out)
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

/// Reads every YAML file under `root` (as the directory source does) into a snapshot;
/// objects that fail to parse or convert are skipped and reported. For tools that need
/// the names behind addresses (`weir policy --source-dir`).
pub fn read_cluster(root: &Path) -> std::io::Result<(Cluster, Vec<SourceError>)> {
    let mut paths = Vec::new();
    files(root, &mut paths)?;
    paths.sort();
    let (objs, mut errs) = read_objects(paths.iter())?;
    let (c, more) = to_cluster(&objs);
    errs.extend(more);
    Ok((c, errs))
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

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tempdir() -> TempDir {
        let d = std::env::temp_dir().join(crate::netns::unique_prefix('y'));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn svc(name: &str, port: u16) -> String {
        format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: d}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: {port}}}]}}\n---\n"
        )
    }

    fn names(evs: &[Event]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                Event::Init(k) => format!("Init {k}"),
                Event::InitApply(o) => format!("InitApply {}", o.key()),
                Event::InitDone(k) => format!("InitDone {k}"),
                Event::Apply(o) => format!("Apply {}", o.key()),
                Event::Delete(o) => format!("Delete {}", o.key()),
                Event::Generation(g) => format!("Generation {g}"),
            })
            .collect()
    }

    /// Rewrites a file so that its stamp changes even within one mtime tick (new inode).
    fn write(p: &Path, text: &str) {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, p).unwrap();
    }

    #[test]
    fn first_poll_lists_everything_then_only_changed_objects() {
        let d = tempdir();
        write(&d.0.join("a.yaml"), &(svc("a1", 80) + &svc("a2", 80)));
        write(&d.0.join("b.yaml"), &svc("b1", 80));
        std::fs::write(d.0.join(GENERATION_FILE), "7").unwrap();
        let mut src = DirSource::new(&d.0);
        let p = src.poll().unwrap();
        let n = names(&p.events);
        assert_eq!(n.iter().filter(|e| e.starts_with("Init ")).count(), 6);
        assert_eq!(n.iter().filter(|e| e.starts_with("InitDone")).count(), 6);
        assert!(n.contains(&"InitApply d/a1".to_string()));
        assert_eq!(n.last().unwrap(), "Generation 7");
        assert_eq!(p.files_read, 2);

        // Nothing changed: nothing read, no events.
        let p = src.poll().unwrap();
        assert!(p.events.is_empty());
        assert_eq!(p.files_read, 0);

        // One object of one file changes: one event, one file read.
        write(&d.0.join("a.yaml"), &(svc("a1", 80) + &svc("a2", 81)));
        let p = src.poll().unwrap();
        assert_eq!(names(&p.events), ["Apply d/a2"]);
        assert_eq!(p.files_read, 1);

        // A file goes away; an object moves between files (no event for it).
        std::fs::remove_file(d.0.join("b.yaml")).unwrap();
        write(&d.0.join("a.yaml"), &svc("a2", 81));
        write(&d.0.join("c.yaml"), &svc("a1", 80));
        let p = src.poll().unwrap();
        assert_eq!(names(&p.events), ["Delete d/b1"]);
        // The generation alone.
        std::fs::write(d.0.join(GENERATION_FILE), "8").unwrap();
        assert_eq!(names(&src.poll().unwrap().events), ["Generation 8"]);
    }

    #[test]
    fn a_configmap_volume_is_read_once_and_its_atomic_swap_is_seen() {
        // The layout kubelet gives a ConfigMap volume: files in a timestamped hidden
        // directory, `..data` pointing at it, and top-level symlinks through `..data`.
        let d = tempdir();
        let v1 = d.0.join("..2026_11_22_05_00_00.1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("objects.yaml"), svc("a", 80)).unwrap();
        std::os::unix::fs::symlink("..2026_11_22_05_00_00.1", d.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/objects.yaml", d.0.join("objects.yaml")).unwrap();
        let mut src = DirSource::new(&d.0);
        let p = src.poll().unwrap();
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.files_read, 1);
        assert!(names(&p.events).contains(&"InitApply d/a".to_string()));
        // kubelet writes a new timestamped directory and swaps `..data` atomically.
        let v2 = d.0.join("..2026_11_22_05_01_00.2");
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v2.join("objects.yaml"), svc("a", 81)).unwrap();
        std::os::unix::fs::symlink("..2026_11_22_05_01_00.2", d.0.join("..data_tmp")).unwrap();
        std::fs::rename(d.0.join("..data_tmp"), d.0.join("..data")).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();
        assert_eq!(names(&src.poll().unwrap().events), ["Apply d/a"]);
    }

    #[test]
    fn the_last_document_of_an_object_in_a_file_wins() {
        let d = tempdir();
        write(
            &d.0.join("a.yaml"),
            &(svc("a1", 80) + &svc("a2", 80) + &svc("a1", 81)),
        );
        let mut src = DirSource::new(&d.0);
        let p = src.poll().unwrap();
        let ports: Vec<String> = p
            .events
            .iter()
            .filter_map(|e| match e {
                Event::InitApply(Object::Service(o))
                    if o.metadata.name.as_deref() == Some("a1") =>
                {
                    let ports = o.spec.as_ref()?.ports.as_ref()?;
                    Some(ports.iter().map(|p| p.port.to_string()).collect())
                }
                _ => None,
            })
            .collect();
        assert_eq!(ports, vec!["81".to_string()]);
    }

    #[test]
    fn broken_yaml_is_reported_and_the_rest_used() {
        let d = tempdir();
        write(&d.0.join("a.yaml"), &(svc("a1", 80) + "foo: [\n"));
        let mut src = DirSource::new(&d.0);
        let p = src.poll().unwrap();
        assert_eq!(p.errors.len(), 1);
        assert!(names(&p.events).contains(&"InitApply d/a1".to_string()));
    }

    #[test]
    fn an_unreadable_directory_is_an_error_and_changes_nothing() {
        let mut src = DirSource::new("/nonexistent/weir-test-dir");
        assert!(src.poll().is_err());
    }
}
