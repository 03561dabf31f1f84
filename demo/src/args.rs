//! The options of `thinvm demo`.

use std::path::PathBuf;

/// `thinvm demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// MiB of random data the guest writes (then deletes).
    #[arg(long, default_value_t = 128)]
    pub fill_mib: u64,
    /// Where the final overlay, the chart and the results go.
    #[arg(long, default_value = "thinvm-demo")]
    pub out: PathBuf,
    /// Overlay format version: 1.1 (qcow2 v3) or 0.10 (v2, where QEMU cannot reclaim).
    #[arg(long, default_value = "1.1")]
    pub compat: String,
    /// Also run the same steps under QEMU microvm (qemu-system-x86_64 with
    /// detect-zeroes=unmap,discard=unmap) on its own fresh overlay; both in one chart.
    #[arg(long)]
    pub compare_qemu: bool,
    /// Run here even on a software-nested host (used when the demo re-runs itself in the
    /// rig).
    #[arg(long, hide = true)]
    pub inside: bool,
}
