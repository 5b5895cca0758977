//! Running the real programs on crafted packets through BPF_PROG_TEST_RUN.
//!
//! [`ProgHarness`] loads the embedded object the way the agent does, but with a unique
//! throwaway pin directory (so every harness has fresh, empty maps) that is removed on
//! drop. Tests write maps through the same [`Datapath`] plans the agent uses, run a
//! program on a packet, and check verdict, output bytes and map contents.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions},
};
use weir_common::{
    ct::{CtEntry, CtKey},
    maps as names,
    policy::PolicyEvent,
};
use weir_core::{
    datapath::Datapath,
    image::MapImage,
    plan::{self, Plan},
};

use super::packet::{self, Parsed};
use crate::{
    datapath::{AyaDatapath, Dataplane, EventSettings, Hook, LoadOptions, maps::open_pinned},
    netns,
};

/// TC verdicts (linux/pkt_cls.h).
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

pub struct RunResult {
    pub verdict: i32,
    pub out: Vec<u8>,
    pub duration: Duration,
}

impl RunResult {
    pub fn parsed(&self) -> Parsed {
        packet::parse(&self.out).expect("program output is an IP frame")
    }
}

pub struct ProgHarness {
    pub dataplane: Dataplane,
    pub dp: AyaDatapath,
    pub pin_dir: PathBuf,
    image: MapImage,
}

impl ProgHarness {
    /// Loads the datapath with fresh maps. Returns an error naming the missing kernel
    /// feature if loading fails.
    pub fn new() -> Result<ProgHarness> {
        Self::with_capacities(BTreeMap::new())
    }

    pub fn with_capacities(capacities: BTreeMap<String, u32>) -> Result<ProgHarness> {
        Self::with_options(capacities, &EventSettings::default())
    }

    /// With flow event settings (rate limit, sampling).
    pub fn with_events(ev: &EventSettings) -> Result<ProgHarness> {
        Self::with_options(BTreeMap::new(), ev)
    }

    pub fn with_options(
        capacities: BTreeMap<String, u32>,
        ev: &EventSettings,
    ) -> Result<ProgHarness> {
        let pin_dir = PathBuf::from("/sys/fs/bpf/weir-test").join(netns::unique_prefix('t'));
        let loaded = Dataplane::load_with_events(
            &LoadOptions {
                pin_dir: pin_dir.clone(),
                capacities,
            },
            ev,
        );
        let mut dataplane = match loaded {
            Ok(d) => d,
            Err(e) => {
                // Nothing owns the pins yet: remove what the failed load created.
                let _ = crate::datapath::PinDir::new(&pin_dir).remove_all();
                return Err(e.context("loading the datapath for BPF_PROG_TEST_RUN"));
            }
        };
        let dp = dataplane.datapath()?;
        Ok(ProgHarness {
            dataplane,
            dp,
            pin_dir,
            image: MapImage::default(),
        })
    }

    /// Makes the maps hold exactly `img` (through a diff from what they hold).
    pub fn program(&mut self, img: &MapImage) -> Result<()> {
        let p = plan::diff(&self.image, img);
        self.apply(&p)?;
        self.image = img.clone();
        Ok(())
    }

    pub fn apply(&mut self, p: &Plan) -> Result<()> {
        let out = self.dp.apply(p);
        if let Some(e) = out.error {
            anyhow::bail!("{e}");
        }
        Ok(())
    }

    /// Runs `hook`'s program once on `frame`.
    pub fn run(&self, hook: Hook, frame: &[u8]) -> Result<RunResult> {
        self.run_repeat(hook, frame, 1)
    }

    /// Runs `repeat` times; `duration` is the kernel's average per run. Note that the
    /// kernel reruns the same skb: a program that rewrites the packet sees its own output
    /// from the second run on (TOOLCHAIN.md).
    pub fn run_repeat(&self, hook: Hook, frame: &[u8], repeat: u32) -> Result<RunResult> {
        let prog = self.dataplane.program(hook)?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", hook.program()))?;
        out.truncate(r.data_size_out as usize);
        Ok(RunResult {
            verdict: r.return_value as i32,
            out,
            duration: r.duration,
        })
    }

    /// Every conntrack entry.
    pub fn ct(&self) -> Result<BTreeMap<CtKey, CtEntry>> {
        let m: HashMap<MapData, CtKey, CtEntry> =
            open_pinned(&self.pin_dir, names::CT)?.try_into()?;
        let mut out = BTreeMap::new();
        for r in m.iter() {
            let (k, v) = r?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Removes every conntrack entry (a test that reuses tuples starts over).
    pub fn clear_ct(&self) -> Result<()> {
        let mut m: HashMap<MapData, CtKey, CtEntry> =
            open_pinned(&self.pin_dir, names::CT)?.try_into()?;
        let keys: Vec<CtKey> = m.keys().collect::<Result<_, _>>()?;
        for k in keys {
            m.remove(&k)?;
        }
        Ok(())
    }

    /// The policy decision record of the last packet each CPU ran (`Work.event`, the
    /// first field of the per-CPU `WORK` slot, which a drop-event emitter copies): one
    /// per possible CPU. BPF_PROG_TEST_RUN runs on the calling thread's CPU.
    pub fn decisions(&self) -> Result<Vec<PolicyEvent>> {
        let map = self
            .dataplane
            .map("WORK")
            .ok_or_else(|| anyhow::anyhow!("map WORK missing"))?;
        let aya::maps::Map::PerCpuArray(data) = map else {
            anyhow::bail!("WORK is not a per-CPU array");
        };
        let value_size = data.info()?.value_size() as usize;
        anyhow::ensure!(
            value_size >= std::mem::size_of::<PolicyEvent>(),
            "WORK is smaller than a PolicyEvent"
        );
        let ncpus = aya::util::nr_cpus().map_err(|(w, e)| anyhow::anyhow!("{w}: {e}"))?;
        // Per-CPU values come back one per possible CPU, each rounded up to 8 bytes.
        let stride = value_size.div_ceil(8) * 8;
        let mut buf = vec![0u8; stride * ncpus];
        let key: u32 = 0;
        #[repr(C)]
        struct LookupAttr {
            map_fd: u32,
            pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let attr = LookupAttr {
            map_fd: data.fd().as_fd().as_raw_fd() as u32,
            pad: 0,
            key: &key as *const u32 as u64,
            value: buf.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_LOOKUP_ELEM (1) writes at most `stride * ncpus` bytes to `value`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                1,
                &attr as *const LookupAttr,
                std::mem::size_of::<LookupAttr>(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("looking up WORK");
        }
        Ok(buf
            .chunks(stride)
            .map(|c| {
                // SAFETY: PolicyEvent is plain old data (weir_common's ABI rules) and
                // the chunk holds at least its size.
                unsafe { std::ptr::read_unaligned(c.as_ptr() as *const PolicyEvent) }
            })
            .collect())
    }

    /// Counters by (reason, direction), summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<(u8, u8), u64>> {
        Ok(crate::datapath::maps::read_counters(&self.pin_dir)?
            .into_iter()
            .map(|(i, c)| (((i >> 1) as u8, (i & 1) as u8), c.packets))
            .collect())
    }
}

impl Drop for ProgHarness {
    fn drop(&mut self) {
        let _ = self.dataplane.remove_pins();
    }
}
