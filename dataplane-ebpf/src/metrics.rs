//! Per-CPU counters by {reason, direction}. Per-CPU values need no atomics; the agent
//! sums the CPUs on scrape.

use weir_common::metrics::index;

use crate::maps::METRICS;

#[inline(always)]
pub fn count(reason: u8, dir: u8, bytes: u32) {
    if let Some(c) = METRICS.get_ptr_mut(index(reason, dir)) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}
