//! The stored refcounts, read block by block in cluster order (never one counter per cluster
//! of the file), and their comparison with the references a walk counted.

use super::refs::{Range, SortedRefs};
use crate::cast::usize_from;
use crate::error::Result;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::refblock::get_entry;
use crate::qcow2::table_read::TableReader;

/// One step of the comparison, in cluster order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// A cluster with a stored refcount or references (or both).
    One {
        cluster: u64,
        stored: u64,
        refs: u64,
    },
    /// Clusters `start..end` of metadata ranges with no stored refcount and nothing else
    /// referencing them: each has refcount 0 and one reference.
    Bulk { start: u64, end: u64 },
}

/// Nonzero stored refcounts, ascending.
struct StoredStream<'a> {
    img: &'a Qcow2Image,
    blocks: &'a [u64],
    reader: &'a mut TableReader,
    nb_clusters: u64,
    next_ti: usize,
    block: Vec<u8>,
    loaded: bool,
    base: u64,
    n: u64,
    pos: u64,
}

impl StoredStream<'_> {
    fn next(&mut self) -> Result<Option<(u64, u64)>> {
        let order = self.img.header.refcount_order;
        let group = 64u64;
        loop {
            if self.loaded {
                while self.pos < self.n {
                    if self.pos % group == 0 {
                        let bytes = (8usize << order) * usize_from(self.pos / group);
                        let end = (bytes + (8usize << order)).min(self.block.len());
                        if self.block[bytes..end].iter().all(|&b| b == 0) {
                            self.pos += group;
                            continue;
                        }
                    }
                    let s = get_entry(&self.block, self.pos, order);
                    self.pos += 1;
                    if s != 0 {
                        return Ok(Some((self.base + self.pos - 1, s)));
                    }
                }
                self.loaded = false;
            }
            let rb = self.img.rb_entries;
            let Some(ti) = (self.next_ti..self.blocks.len())
                .find(|&ti| self.blocks[ti] != 0 && (ti as u64) * rb < self.nb_clusters)
            else {
                return Ok(None);
            };
            self.next_ti = ti + 1;
            self.base = ti as u64 * rb;
            self.n = rb.min(self.nb_clusters - self.base);
            self.pos = 0;
            self.loaded = self.reader.read(
                &self.img.file,
                self.img.file_len,
                &mut self.block,
                self.blocks[ti],
            )?;
        }
    }
}

/// Stored refcounts of clusters asked for in ascending order (each block read once).
pub struct StoredReader<'a> {
    img: &'a Qcow2Image,
    blocks: &'a [u64],
    reader: &'a mut TableReader,
    ti: Option<u64>,
    present: bool,
    block: Vec<u8>,
}

impl<'a> StoredReader<'a> {
    /// `blocks`: the valid refcount block offset of each refcount table index (0: none).
    pub fn new(img: &'a Qcow2Image, blocks: &'a [u64], reader: &'a mut TableReader) -> Self {
        StoredReader {
            img,
            blocks,
            reader,
            ti: None,
            present: false,
            block: vec![0u8; usize_from(img.cluster_size)],
        }
    }

    pub fn get(&mut self, cluster: u64) -> Result<u64> {
        let rb = self.img.rb_entries;
        let ti = cluster / rb;
        if self.ti != Some(ti) {
            self.ti = Some(ti);
            let off = usize::try_from(ti)
                .ok()
                .and_then(|t| self.blocks.get(t))
                .copied()
                .unwrap_or(0);
            self.present = off != 0
                && self
                    .reader
                    .read(&self.img.file, self.img.file_len, &mut self.block, off)?;
        }
        Ok(if self.present {
            get_entry(&self.block, cluster % rb, self.img.header.refcount_order)
        } else {
            0
        })
    }
}

/// Walks clusters `from..nb_clusters` in order and calls `f` for every cluster with a
/// stored refcount or a reference, and for the runs of metadata `ranges` (sorted, disjoint)
/// that have neither. Costs the nonzero stored refcounts, the referenced clusters and the
/// ranges, not the file's length. `f` returns whether to go on; when it stops the walk,
/// returns the cluster to start from next time.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    img: &Qcow2Image,
    blocks: &[u64],
    reader: &mut TableReader,
    nb_clusters: u64,
    refs: &SortedRefs,
    ranges: &[Range],
    from: u64,
    f: &mut dyn FnMut(Item) -> Result<bool>,
) -> Result<Option<u64>> {
    let rb = img.rb_entries;
    let mut stored = StoredStream {
        img,
        blocks,
        reader,
        nb_clusters,
        next_ti: usize::try_from(from / rb).unwrap_or(usize::MAX),
        block: vec![0u8; usize_from(img.cluster_size)],
        loaded: false,
        base: 0,
        n: 0,
        pos: 0,
    };
    let mut s_next = stored.next()?;
    while s_next.is_some_and(|(c, _)| c < from) {
        s_next = stored.next()?;
    }
    let mut points = refs.iter_from(from).peekable();
    let mut ri = ranges.partition_point(|r| r.end <= from);
    // The first cluster of range `ri` not yet accounted for.
    let mut cursor = ranges.get(ri).map_or(0, |r| r.start.max(from));
    loop {
        let c = match (s_next, points.peek()) {
            (None, None) => break,
            (Some((a, _)), None) => a,
            (None, Some(&(b, _))) => b,
            (Some((a, _)), Some(&(b, _))) => a.min(b),
        };
        // Runs of ranges before `c`.
        while let Some(r) = ranges.get(ri) {
            let start = cursor.max(r.start);
            let to = r.end.min(c);
            if to > start {
                let go_on = f(Item::Bulk { start, end: to })?;
                cursor = to;
                if !go_on {
                    return Ok(Some(to));
                }
            }
            if r.end <= c {
                ri += 1;
                cursor = ranges.get(ri).map_or(0, |r| r.start);
            } else {
                cursor = cursor.max(c);
                break;
            }
        }
        let in_range = ranges.get(ri).is_some_and(|r| r.start <= c && c < r.end);
        let mut s = 0;
        if let Some((a, v)) = s_next {
            if a == c {
                s = v;
                s_next = stored.next()?;
            }
        }
        let mut p = 0;
        if points.peek().is_some_and(|&(b, _)| b == c) {
            p = points.next().map_or(0, |(_, r)| r);
        }
        if in_range {
            cursor = c + 1;
        }
        let go_on = f(Item::One {
            cluster: c,
            stored: s,
            refs: u64::from(p) + u64::from(in_range),
        })?;
        if !go_on {
            return Ok(Some(c + 1));
        }
    }
    while let Some(r) = ranges.get(ri) {
        let start = cursor.max(r.start);
        if r.end > start && !f(Item::Bulk { start, end: r.end })? {
            return Ok(Some(r.end));
        }
        ri += 1;
        cursor = ranges.get(ri).map_or(0, |r| r.start);
    }
    Ok(None)
}
