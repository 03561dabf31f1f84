//! Size samples of the overlay over time: what the chart draws.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::overlay::usage;

/// A size sample for the chart.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub allocated: u64,
    pub apparent: u64,
}

/// Milliseconds since `start` (saturating: u64 milliseconds last 584 million years).
pub fn ms_since(start: &Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Appends the overlay's size now to `samples`.
pub fn push_sample(samples: &Arc<Mutex<Vec<Sample>>>, start: &Instant, overlay: &Path) {
    let (a, p) = usage(overlay);
    let s = Sample {
        t_ms: ms_since(start),
        allocated: a,
        apparent: p,
    };
    match samples.lock() {
        Ok(mut v) => v.push(s),
        Err(p) => p.into_inner().push(s),
    }
}
