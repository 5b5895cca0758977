//! Network namespaces, links and child processes for the demo, the lab and the tests.
//!
//! Safety rules these helpers enforce (the machines are shared):
//! - everything is created inside named namespaces carrying a caller-chosen prefix;
//!   veth pairs are created directly inside those namespaces, never in the root one;
//! - [`NetnsGuard`] deletes its namespace by name on drop, also while unwinding from a
//!   panic, and [`remove_by_prefix`] removes what a crashed run left behind;
//! - [`ChildGuard`] kills only the process it started, by PID.
//!
//! Namespaces are entered with setns(2) on a thread (or in a child before exec), not with
//! `ip netns exec`, which remounts /sys and hides bpffs and cgroupfs (TOOLCHAIN.md).

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs `ip` with `args`, returning stdout; the error carries ip's stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2 is required: scripts/bootstrap.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a batch of `ip` commands (one per line, without the leading `ip`) inside the
/// named namespace in one process: much faster than one `ip` per command when building
/// a topology.
pub fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    use std::io::Write as _;
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `ip -batch`")?;
    {
        let mut stdin = child.stdin.take().context("ip stdin")?;
        for l in lines {
            writeln!(stdin, "{l}")?;
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// Enters the named namespace on the current thread.
pub fn enter(name: &str) -> Result<()> {
    let f = File::open(netns_path(name))
        .with_context(|| format!("opening network namespace {name}"))?;
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns into {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside the named namespace and returns its result.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || -> Result<T> {
        enter(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// Makes `cmd` start inside the named namespace (setns in the child before exec).
pub fn command_in(name: &str, cmd: &mut Command) -> Result<()> {
    let f = File::open(netns_path(name))
        .with_context(|| format!("opening network namespace {name}"))?;
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A named network namespace, deleted by name on drop.
pub struct NetnsGuard {
    pub name: String,
    keep: bool,
}

impl NetnsGuard {
    pub fn create(name: &str) -> Result<NetnsGuard> {
        if name.len() > 64 || name.contains('/') {
            bail!("bad namespace name {name:?}");
        }
        ip(&["netns", "add", name])?;
        let g = NetnsGuard {
            name: name.to_string(),
            keep: false,
        };
        // Loopback up: servers and probes inside use it.
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(g)
    }

    /// Leaves the namespace in place on drop (the lab keeps running after `lab up`).
    pub fn keep(mut self) -> String {
        self.keep = true;
        self.name.clone()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}

/// Namespaces whose names start with `prefix`.
pub fn list_by_prefix(prefix: &str) -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Deletes every namespace whose name starts with `prefix` (after a crash).
pub fn remove_by_prefix(prefix: &str) -> usize {
    let names = list_by_prefix(prefix);
    for n in &names {
        let _ = ip(&["netns", "del", n]);
    }
    names.len()
}

/// A unique short prefix for names of one run: interface names are limited to 15 bytes,
/// so prefixes stay at 6 characters.
pub fn unique_prefix(tag: char) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let x = (std::process::id() as u64).wrapping_mul(2654435761)
        ^ nanos as u64
        ^ rand::random::<u32>() as u64;
    format!("w{tag}{:04x}", x & 0xffff)
}

/// A child process killed by PID when dropped.
pub struct ChildGuard {
    pub child: Child,
    pub what: String,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<ChildGuard> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(ChildGuard {
            child,
            what: what.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit, then SIGKILL.
    pub fn stop(&mut self, grace: std::time::Duration) {
        let pid = self.child.id() as i32;
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Simple glob match supporting `*` anywhere (interface name patterns).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn rec(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => rec(&p[1..], n) || (!n.is_empty() && rec(p, &n[1..])),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &n[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), name.as_bytes())
}

/// Names of the interfaces of the current network namespace.
pub fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified`
/// on hybrid ones such as these machines), read from /proc/self/mounts.
pub fn cgroup2_root() -> Result<std::path::PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| std::path::PathBuf::from(dir))
        })
        .context("no cgroup2 filesystem is mounted")
}

/// A cgroup v2 directory created for a test or lab, removed on drop. Removal needs the
/// cgroup to be empty: callers stop their processes first (the guard retries briefly
/// while the kernel finishes reaping them).
pub struct CgroupGuard {
    pub path: std::path::PathBuf,
    keep: bool,
}

impl CgroupGuard {
    /// Creates `<cgroup2 root>/<name>`; `name` must carry the caller's unique prefix.
    pub fn create(name: &str) -> Result<CgroupGuard> {
        if name.contains('/') || name.is_empty() {
            bail!("bad cgroup name {name:?}");
        }
        let path = cgroup2_root()?.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(CgroupGuard { path, keep: false })
    }

    pub fn keep(mut self) -> std::path::PathBuf {
        self.keep = true;
        self.path.clone()
    }

    /// Makes `cmd`'s process join this cgroup before exec (combine with `command_in`).
    pub fn command_in(&self, cmd: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
    }
}

/// Removes a cgroup directory, waiting up to a second for it to empty.
pub fn remove_cgroup(path: &std::path::Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if !self.keep {
            remove_cgroup(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("w*", "wab12c"));
        assert!(glob_match("*-h", "pod1-h"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }
}
