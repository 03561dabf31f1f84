//! The result table: one row per step, printed as Markdown.

use units::human_size;

/// One row of the result table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub step: String,
    pub what: String,
    /// Time the step took inside the guest (ms), if it ran in the guest.
    pub guest_ms: Option<u64>,
    /// Wall time of the whole boot-run-shutdown cycle (ms).
    pub wall_ms: u64,
    pub allocated: u64,
    pub apparent: u64,
    pub check: String,
}

/// Prints `rows` as a Markdown table.
pub fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| {:<9} | {:<28} | {:>9} | {:>9} | {:>11} | {:>11} | {:<14} |",
        "step", "what", "guest", "boot+step", "allocated", "apparent", "image check"
    );
    println!(
        "|{}|",
        [
            "-----------",
            "------------------------------",
            "----------:",
            "----------:",
            "------------:",
            "------------:",
            "----------------"
        ]
        .join("|")
    );
    for r in rows {
        println!(
            "| {:<9} | {:<28} | {:>9} | {:>9} | {:>11} | {:>11} | {:<14} |",
            r.step,
            r.what,
            r.guest_ms
                .map(|m| format!("{:.1}s", m as f64 / 1000.0))
                .unwrap_or_default(),
            if r.wall_ms > 0 {
                format!("{:.1}s", r.wall_ms as f64 / 1000.0)
            } else {
                String::new()
            },
            human_size(r.allocated),
            human_size(r.apparent),
            r.check
        );
    }
}
