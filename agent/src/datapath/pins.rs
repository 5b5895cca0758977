//! The per-instance bpffs directory: creation, compatibility checks of pinned maps,
//! listing and removal.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;

use super::maps::expected_layout;

pub struct PinDir {
    root: PathBuf,
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (fresh machines lack it).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    let src = std::ffi::CString::new("bpf")?;
    let dst = std::ffi::CString::new("/sys/fs/bpf")?;
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl PinDir {
    pub fn new(root: &Path) -> PinDir {
        PinDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn create(&self) -> Result<()> {
        for d in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    /// `<ifindex>_<ifname>_<hook>`. bpffs refuses names with a dot (reserved for its
    /// own files), and interface names may contain dots, so they become `_` here; the
    /// ifindex (first field) is what identifies the interface.
    pub fn link_path(&self, ifname: &str, ifindex: u32, suffix: &str) -> PathBuf {
        self.links_dir()
            .join(format!("{ifindex}_{}_{suffix}", ifname.replace('.', "_")))
    }

    /// Pinned links as (ifname as pinned, ifindex, hook suffix, path).
    pub fn links(&self) -> Vec<(String, u32, String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.links_dir()) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((idx, rest)) = name.split_once('_') else {
                continue;
            };
            let Some((ifname, suffix)) = rest.rsplit_once('_') else {
                continue;
            };
            let Ok(idx) = idx.parse() else { continue };
            out.push((ifname.to_string(), idx, suffix.to_string(), e.path()));
        }
        out
    }

    /// Refuses to adopt a pinned map whose layout differs from this build's: aya reuses a
    /// pin by name without checking, and a smaller or differently shaped map would be
    /// silently misread (TOOLCHAIN.md, "Runtime pitfalls").
    pub fn check_compatible(&self, capacities: &BTreeMap<&'static str, u32>) -> Result<()> {
        for (name, cap) in capacities {
            let path = self.maps_dir().join(name);
            if !path.exists() {
                continue;
            }
            let Some((key_size, value_size)) = expected_layout(name) else {
                continue;
            };
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            let info = data.info()?;
            let (k, v, m) = (info.key_size(), info.value_size(), info.max_entries());
            if k != key_size || v != value_size || m != *cap {
                bail!(
                    "pinned map {} does not match this build (key {k} / value {v} / max {m} bytes, \
                     expected {key_size} / {value_size} / {cap}); remove the instance with \
                     `weir cleanup --pin-dir {}` (drops its state) or use the old capacities",
                    path.display(),
                    self.root.display()
                );
            }
        }
        Ok(())
    }

    /// Removes every pin of this instance.
    pub fn remove_all(&self) -> Result<()> {
        if self.root.exists() {
            remove_pin_dir(&self.root)
                .with_context(|| format!("removing {}", self.root.display()))?;
        }
        Ok(())
    }
}

/// Removes a pin directory, and its parent when that is one of weir's own roots
/// (`/sys/fs/bpf/weir`, `/sys/fs/bpf/weir-test`, ...) and now empty: `create_dir_all`
/// made the root for the first pin directory, so the last one to go takes it along
/// (`remove_dir` refuses a root other agents or tests still use).
pub fn remove_pin_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(dir)?;
    if let Some(parent) = dir.parent()
        && parent
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("weir"))
    {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_pin_dir_takes_its_weir_root_along() {
        let base = std::env::temp_dir().join(format!("weir-pins-{}", std::process::id()));
        let root = base.join("weir-test");
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(a.join("maps")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        remove_pin_dir(&a).unwrap();
        assert!(root.exists(), "b still uses the root");
        remove_pin_dir(&b).unwrap();
        assert!(!root.exists(), "the empty root is gone");
        assert!(base.exists(), "only a weir* parent is removed");
        std::fs::remove_dir(&base).unwrap();
    }
}
