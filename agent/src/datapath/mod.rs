//! The real datapath: load the embedded eBPF object, pin its maps and links under a
//! per-instance bpffs directory, attach programs to interfaces, and write maps through
//! [`weir_core::datapath::Datapath`].
//!
//! # Pin layout
//! ```text
//! /sys/fs/bpf/weir/<instance>/maps/<MAP>                 every map (adopted on restart)
//! /sys/fs/bpf/weir/<instance>/links/<ifindex>_<ifname>_<hook>   TCX links (survive the agent)
//! ```
//! A restarted agent reopens the pinned maps (after checking that their key size, value
//! size, type and capacity still match this build) and swaps its freshly loaded programs
//! into the pinned links atomically (`bpf_link_update`), so traffic never sees a gap.

pub mod gc;
pub mod maps;
mod pins;
pub use pins::remove_pin_dir;
pub mod sockdiag;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use tracing::{debug, info, warn};

pub use self::{maps::AyaDatapath, pins::PinDir};

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-dataplane"));

/// Default bpffs root for weir's pins.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/weir";

/// Where a TC program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Host side of a pod veth, ingress: packets from the pod.
    FromPod,
    /// Host side of a pod veth, egress: packets to the pod.
    ToPod,
    /// Node uplink, ingress.
    UplinkIn,
    /// Node uplink, egress: the node's own traffic to Service frontends.
    UplinkOut,
}

impl Hook {
    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => "tc_from_pod",
            Hook::ToPod => "tc_to_pod",
            Hook::UplinkIn => "tc_uplink_in",
            Hook::UplinkOut => "tc_uplink_out",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod | Hook::UplinkIn => TcAttachType::Ingress,
            Hook::ToPod | Hook::UplinkOut => TcAttachType::Egress,
        }
    }

    fn pin_suffix(self) -> &'static str {
        match self {
            Hook::FromPod => "frompod",
            Hook::ToPod => "topod",
            Hook::UplinkIn => "uplinkin",
            Hook::UplinkOut => "uplinkout",
        }
    }

    pub const ALL: [Hook; 4] = [Hook::FromPod, Hook::ToPod, Hook::UplinkIn, Hook::UplinkOut];
}

/// The socket-level load-balancing programs (cgroup sock_addr hooks).
pub const SOCK_PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_connect6",
    "sock_sendmsg4",
    "sock_sendmsg6",
    "sock_recvmsg4",
    "sock_recvmsg6",
    "sock_getpeername4",
    "sock_getpeername6",
];

/// Flow event settings, fixed at load time (read-only globals of the object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSettings {
    /// Events per second per CPU and class (drops / new connections).
    pub rate: u64,
    /// Burst size of the token bucket.
    pub burst: u64,
    /// One new-connection event in this many.
    pub flow_sample: u32,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            rate: weir_common::events::DEFAULT_EVENT_RATE,
            burst: weir_common::events::DEFAULT_EVENT_BURST,
            flow_sample: 1,
        }
    }
}

/// tracing target of the eBPF programs' aya-log messages.
pub const KERNEL_LOG_TARGET: &str = "weir::ebpf";

/// Forwards aya-log records from the kernel side to tracing, at debug level (the
/// kernel's own level is a field): the datapath logs only on rare paths, and an operator
/// turns them on with `--log-level weir::ebpf=debug`.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        tracing::debug!(target: "weir::ebpf", kernel_level = %r.level(), "{}", r.args());
    }
    fn flush(&self) {}
}

/// Reads the kernel side's log ring buffer (`AYA_LOGS`).
pub type KernelLogger = aya_log::EbpfLogger<KernelLog>;

/// A digest (FNV-1a, 64 bits) of the embedded eBPF object: which datapath this build
/// runs (`weir_build_info{datapath}`).
pub fn object_digest() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Options for loading the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Per-instance pin directory (`<bpffs root>/<instance>`).
    pub pin_dir: PathBuf,
    /// Capacity overrides by map name.
    pub capacities: BTreeMap<String, u32>,
}

/// A loaded datapath: programs in the kernel, maps pinned.
pub struct Dataplane {
    ebpf: Ebpf,
    pins: PinDir,
    /// Interfaces with attached hooks (their links are pinned; this is bookkeeping).
    attached: BTreeMap<(String, Hook), ()>,
    capacities: BTreeMap<&'static str, u32>,
    logger: Option<KernelLogger>,
}

/// The effective capacity of every map.
pub fn effective_capacities(overrides: &BTreeMap<String, u32>) -> BTreeMap<&'static str, u32> {
    weir_common::maps::ALL
        .iter()
        .map(|(name, def)| (*name, overrides.get(*name).copied().unwrap_or(*def)))
        .collect()
}

impl Dataplane {
    /// Loads the programs and creates or adopts the pinned maps.
    pub fn load(opts: &LoadOptions) -> Result<Dataplane> {
        Self::load_with_events(opts, &EventSettings::default())
    }

    /// [`Dataplane::load`] with flow event settings.
    pub fn load_with_events(opts: &LoadOptions, ev: &EventSettings) -> Result<Dataplane> {
        if OBJECT.is_empty() {
            bail!("this weir binary was built with AYA_BUILD_SKIP=1 and carries no eBPF object");
        }
        pins::ensure_bpffs()?;
        let pins = PinDir::new(&opts.pin_dir);
        pins.create()?;
        let capacities = effective_capacities(&opts.capacities);
        for (name, cap) in &capacities {
            if *cap == 0 {
                bail!("map {name}: capacity must be at least 1");
            }
        }
        pins.check_compatible(&capacities)?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps_dir());
        for (name, cap) in &capacities {
            loader.map_max_entries(name, *cap);
        }
        // The event rate limiter's constants (weir_common::events): nanoseconds of credit
        // per event and the bucket size, so the datapath divides nothing.
        let cost_ns: u64 = 1_000_000_000 / ev.rate.max(1);
        let burst_ns: u64 = cost_ns.saturating_mul(ev.burst.max(1));
        let sample: u32 = ev.flow_sample.max(1);
        loader.override_global(weir_common::events::GLOBAL_EVENT_COST_NS, &cost_ns, true);
        loader.override_global(weir_common::events::GLOBAL_EVENT_BURST_NS, &burst_ns, true);
        loader.override_global(weir_common::events::GLOBAL_FLOW_SAMPLE, &sample, true);
        // aya-log statements write to their ring only at or below this level: debug when
        // the agent would show them, otherwise none (hot paths stay silent).
        let log_level: u8 = if tracing::enabled!(target: KERNEL_LOG_TARGET, tracing::Level::DEBUG) {
            aya_log_common_level_debug()
        } else {
            0
        };
        loader.override_global(aya_log::LEVEL, &log_level, false);
        let mut ebpf = loader.load(OBJECT).with_context(|| {
            format!(
                "loading the eBPF object (maps pinned under {})",
                pins.maps_dir().display()
            )
        })?;
        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog) {
            Ok(l) => Some(l),
            Err(e) => {
                // The object may carry no log statements on this build; not an error.
                debug!("aya-log not initialised: {e}");
                None
            }
        };
        for hook in Hook::ALL {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(hook.program())
                .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program()))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected program {}", hook.program()))?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected program {name}"))?;
        }
        fill_crc_shift(&mut ebpf)?;
        info!(pin_dir = %opts.pin_dir.display(), "datapath loaded");
        Ok(Dataplane {
            ebpf,
            pins,
            attached: BTreeMap::new(),
            capacities,
            logger,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        self.pins.root()
    }

    /// Attaches `hook` to `ifname`, reusing (and atomically updating) a pinned link when
    /// one exists from an earlier agent.
    pub fn attach(&mut self, ifname: &str, hook: Hook) -> Result<()> {
        if self.attached.contains_key(&(ifname.to_string(), hook)) {
            return Ok(());
        }
        // The ifindex is part of the pin name: an interface that was deleted and
        // recreated under the same name (a restarted pod) has a new ifindex, so a stale
        // link of the old one is never adopted for it.
        let ifindex = ifindex(ifname)?;
        let pin = self.pins.link_path(ifname, ifindex, hook.pin_suffix());
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.program())
            .ok_or_else(|| anyhow!("program {} missing", hook.program()))?
            .try_into()?;
        let adopted = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let fd: FdLink = old.into();
                let link = SchedClassifierLink::try_from(fd)?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // Take the link out of the program's link map (which detaches
                        // on drop); dropping the fd then only closes it, and the pin
                        // keeps the link attached.
                        let link = prog.take_link(id)?;
                        drop(FdLink::try_from(link)?);
                        true
                    }
                    Err(e) => {
                        warn!(ifname, "pinned link not adoptable ({e}); attaching anew");
                        let _ = std::fs::remove_file(&pin);
                        false
                    }
                }
            }
            Err(_) => false,
        };
        if !adopted {
            let id = prog
                .attach_with_options(
                    ifname,
                    hook.attach_type(),
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {} to {ifname}", hook.program()))?;
            let link = prog.take_link(id)?;
            let fd: FdLink = link.try_into()?;
            fd.pin(&pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
        }
        debug!(ifname, ?hook, adopted, "attached");
        self.attached.insert((ifname.to_string(), hook), ());
        Ok(())
    }

    /// Attaches the socket-level load balancer to the cgroup v2 directory `cgroup` (all
    /// of a node's pods and its host processes should be below it). Links are pinned as
    /// `links/cgroup_<program>`; an earlier agent's links are replaced by attaching the
    /// new programs first and then dropping the old links (multi-attach: while both run,
    /// the second sees a backend, not a frontend, and changes nothing).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in SOCK_PROGRAMS {
            let pin = self.pins.links_dir().join(format!("cgroup_{name}"));
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            // Link-based cgroup attachment (what aya uses on >= 5.7) takes no flags and
            // always allows several links per hook, which the replace-on-restart above
            // relies on.
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            let fd: FdLink = prog.take_link(id)?.try_into()?;
            let old = PinnedLink::from_pin(&pin).ok();
            if let Some(old) = old {
                let old: FdLink = old.unpin()?;
                drop(old);
            }
            fd.pin(&pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
        }
        debug!(cgroup = %cgroup.display(), "socket load balancing attached");
        Ok(())
    }

    /// Detaches every hook of `ifname` (removes its pinned links).
    pub fn detach_all(&mut self, ifname: &str) {
        let idx = ifindex(ifname).ok();
        for (_, i, _, path) in self.pins.links() {
            if Some(i) == idx {
                let _ = std::fs::remove_file(path);
            }
        }
        for hook in Hook::ALL {
            self.attached.remove(&(ifname.to_string(), hook));
        }
    }

    /// Forgets interfaces that no longer exist and removes their pinned links.
    pub fn prune_links(&mut self) {
        for (ifname, idx, suffix, path) in self.pins.links() {
            if ifname_of(idx).map(|n| n.replace('.', "_")) != Some(ifname.clone()) {
                debug!(
                    ifname,
                    idx, suffix, "removing link pin of a vanished interface"
                );
                let _ = std::fs::remove_file(path);
            }
        }
        // Forget attachments whose interface is gone (or was recreated with a new index).
        self.attached.retain(|(name, _), _| ifindex(name).is_ok());
    }

    pub fn attached(&self) -> impl Iterator<Item = &(String, Hook)> {
        self.attached.keys()
    }

    /// The kernel side's log reader (once; the agent polls it from a task).
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// Reads the kernel side's pending log records into tracing now (tests).
    pub fn flush_kernel_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// The flow event ring buffer (once: the agent is its only reader).
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let m = self
            .ebpf
            .take_map(weir_common::maps::EVENTS)
            .ok_or_else(|| anyhow!("map EVENTS missing from the eBPF object"))?;
        Ok(m.try_into()?)
    }

    /// Effective capacity of every map.
    pub fn capacities(&self) -> &BTreeMap<&'static str, u32> {
        &self.capacities
    }

    /// The map writer over this datapath's maps.
    pub fn datapath(&mut self) -> Result<AyaDatapath> {
        AyaDatapath::take(&mut self.ebpf, self.capacities.clone())
    }

    /// Loaded program handle (tests use it for BPF_PROG_TEST_RUN).
    pub fn program(&self, hook: Hook) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(hook.program())
            .ok_or_else(|| anyhow!("program {} missing", hook.program()))?
            .try_into()?)
    }

    /// A map of the loaded object by name, pinned or not (tests read the per-CPU `WORK`
    /// slot through it).
    pub fn map(&self, name: &str) -> Option<&aya::maps::Map> {
        self.ebpf.map(name)
    }

    /// Removes every pin (maps and links): the datapath goes away once this process
    /// drops its handles.
    pub fn remove_pins(&self) -> Result<()> {
        self.pins.remove_all()
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if !self.attached.is_empty() {
            debug!(
                n = self.attached.len(),
                "dataplane handle dropped; pinned links stay attached"
            );
        }
    }
}

/// Name of the interface with this index in the current network namespace.
pub fn ifname_of(idx: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(idx, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    Some(
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Writes the CRC32c shift table SCTP port translation reads (weir_common::crc32c).
fn fill_crc_shift(ebpf: &mut Ebpf) -> Result<()> {
    use weir_common::{crc32c::x8nmodp, maps::CRC32C_SHIFT};
    let mut arr: aya::maps::Array<_, u32> = ebpf
        .map_mut(CRC32C_SHIFT)
        .ok_or_else(|| anyhow!("map {CRC32C_SHIFT} missing"))?
        .try_into()?;
    for n in 0..arr.len() {
        arr.set(n, x8nmodp(n), 0)?;
    }
    Ok(())
}

/// The cookie of the current network namespace (SO_NETNS_COOKIE), as
/// bpf_get_netns_cookie reports it for sockets created here.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut _,
            &mut len,
        )
    };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("getsockopt(SO_NETNS_COOKIE): {err}");
    }
    Ok(cookie)
}

/// ifindex of an interface in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    let c = std::ffi::CString::new(ifname)?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface named {ifname}");
    }
    Ok(i)
}

/// aya-log's `Level::Debug` (aya_log_common: Error = 1 ... Trace = 5).
const fn aya_log_common_level_debug() -> u8 {
    4
}
