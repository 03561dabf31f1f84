//! What a consistency check finds ([`CheckReport`], `qemu-img check`'s counts) and which
//! repairs it may make ([`RepairMode`]).

/// Which problems `check` may repair, as `qemu-img check -r leaks|all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    Leaks,
    All,
}

/// The result of a consistency check, with `qemu-img check --output=json`'s fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    /// Refcounts too low, L2 entries pointing at invalid places, overlapping metadata ...
    pub corruptions: u64,
    /// Clusters with a refcount but no reference.
    pub leaks: u64,
    /// Errors that prevented checking part of the image.
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: Option<u64>,
    pub total_clusters: Option<u64>,
    pub allocated_clusters: Option<u64>,
    pub fragmented_clusters: Option<u64>,
    pub compressed_clusters: Option<u64>,
    /// One human-readable line per problem found (`ERROR ...`, `Leaked cluster ...`).
    pub messages: Vec<String>,
    /// Lines left out of `messages` (an image can have millions of problems; they are all
    /// counted, the first ones are listed).
    pub messages_dropped: u64,
}
