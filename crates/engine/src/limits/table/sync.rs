//! The table's side of the rate-limit sync: draining the cells changed
//! since the last sync, and marking cells changed again when their sync
//! did not reach the log.

use super::{lock, store, LimitTable, ShardState};
use crate::limits::{Cell, CELL_BYTES};

impl LimitTable {
    /// Cells changed since they were last drained, marked clean again: what
    /// a leader replicates in its next sync entry. Stops at about `max`
    /// cells or once keys and cells reach `max_bytes` (a chunk goes past
    /// either bound only by the cells taken in its last step: one, or the
    /// few that share its hash tag; a key is at most 1 KiB). Call until
    /// empty to take every change. Locks one shard at a time.
    pub fn drain_dirty(&self, max: usize, max_bytes: usize) -> Vec<(String, Cell)> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let full = |out: &Vec<_>, bytes: usize| out.len() >= max || bytes >= max_bytes;
        for shard in self.shards.iter() {
            let mut guard = lock(shard);
            let ShardState { table, dirty, .. } = &mut *guard;
            // Visit the changed cells in the order they sit in the table
            // (a bucket's index is the hash's low bits): the walk then moves
            // forward through memory instead of missing the cache per cell.
            let buckets = (table.capacity() * 8 / 7).next_power_of_two() as u64;
            let position = |h: &u64| std::cmp::Reverse(h & (buckets - 1));
            if !dirty.is_sorted_by_key(position) {
                dirty.sort_unstable_by_key(position);
            }
            while !full(&out, bytes) {
                let Some(h) = dirty.pop() else { break };
                // Several keys may share a hash: take every dirty one.
                for e in table.iter_hash_mut(h) {
                    if e.1.is_dirty() {
                        e.1 = e.1.clean();
                        let key = e.0.as_str();
                        bytes += key.len() + CELL_BYTES;
                        out.push((key.to_owned(), e.1));
                    }
                }
            }
            if dirty.is_empty() && dirty.capacity() > 4096 {
                dirty.shrink_to(1024);
            }
            if full(&out, bytes) {
                break;
            }
        }
        out
    }

    /// Marks the cells of `keys` changed again (those still held), so the
    /// next drain takes them: for a sync that did not reach the log.
    pub fn mark_dirty<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        for key in keys {
            let (h, s) = self.locate(key);
            let mut guard = lock(&self.shards[s]);
            let ShardState { table, dirty, .. } = &mut *guard;
            if let Some(e) = table.find_mut(h, |e| e.0.is(key)) {
                let cell = e.1;
                store(e, cell, h, dirty);
            }
        }
    }
}
