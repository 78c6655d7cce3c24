//! The rate-limit sync: the leader replicates changed bucket and window
//! state every `--limit-sync-ms`, so a failover forgets at most about one
//! interval of consumption.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::slots::Slots;
use super::tasks::Stopping;
use super::timekeeping::Timekeeper;
use super::view::View;
use crate::engine::{Command, Engine};
use crate::raft::Request;

/// Most cells in one sync entry.
const SYNC_CELLS: usize = 10_000;
/// Most packed bytes of cells in one sync entry (plus the few cells of the
/// last step). With keys of up to 1 KiB a cell count alone would let one
/// entry reach 10 MB; every entry must reach a follower whole, quickly.
pub const SYNC_BYTES: usize = 64 * 1024;
/// Sync entries proposed but not yet committed, at most: enough to keep
/// many small entries moving through one commit round trip, and a bound
/// on the memory a sync holds (`SYNC_PIPELINE × SYNC_BYTES`).
const SYNC_PIPELINE: usize = 16;

/// The sync loop and what it uses.
pub struct LimitSync {
    pub view: View,
    pub engine: Arc<Engine>,
    pub time: Arc<Timekeeper>,
    /// Tags this process's syncs, which it skips when applying them.
    pub boot_id: u64,
    /// `--limit-sync-ms`.
    pub every: Duration,
    /// Sends an owner's syncs to the leader.
    pub slots: Arc<Slots>,
}

impl LimitSync {
    /// As leader, replicates the rate-limit cells changed since the last
    /// tick, every `every`. A crash or failover therefore forgets at most
    /// the consumption of one interval (plus the sync in flight). Ends when
    /// told to stop.
    pub async fn run(self, stop: Stopping) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {}
                _ = stop.wait() => return,
            }
            if self.view.is_leader() {
                self.sync_changed_limits().await;
                self.sync_changed_breakers(true).await;
            } else if self.slots.spread() && self.engine.slots().assigned() {
                self.send_changed_limits().await;
                self.sync_changed_breakers(false).await;
            }
        }
    }

    /// As an owner that does not lead: sends the cells changed by now to
    /// the leader in bounded entries (up to [`SYNC_PIPELINE`] drained at
    /// once), one at a time, each once the previous one committed. Cells
    /// that change while those are on their way wait for the next tick:
    /// draining again after each commit would send a few cells an entry,
    /// an entry a round trip, under steady load.
    async fn send_changed_limits(&self) {
        loop {
            let mut entries = Vec::new();
            while entries.len() < SYNC_PIPELINE {
                let cells = self.engine.drain_dirty_limits(SYNC_CELLS, SYNC_BYTES);
                if cells.is_empty() {
                    break;
                }
                entries.push(cells);
            }
            let more = entries.len() == SYNC_PIPELINE;
            let mut entries = entries.into_iter();
            while let Some(cells) = entries.next() {
                let n = cells.len();
                metrics::counter!("arbiter_limit_sync_cells_total").increment(n as u64);
                let keys: Vec<String> = cells.iter().map(|(k, _)| k.clone()).collect();
                if let Err(e) = self.slots.send_sync(self.boot_id, cells).await {
                    // Sent again next time (as they are then), with those
                    // drained behind them: an owner that keeps its slots
                    // must not lose what it decided because a leader
                    // changed. (A cell whose slot moved meanwhile is
                    // dropped where it is applied.)
                    let later = entries.flat_map(|cells| cells.into_iter().map(|(k, _)| k));
                    let later: Vec<String> = later.collect();
                    self.engine
                        .requeue_dirty_limits(keys.iter().chain(later.iter()).map(String::as_str));
                    tracing::warn!(error = %e, cells = n, "rate-limit sync not taken by the leader");
                    return;
                }
            }
            if !more {
                return;
            }
        }
    }

    /// Drains every changed cell into bounded entries and commits them,
    /// keeping up to [`SYNC_PIPELINE`] entries in flight. Entries are handed
    /// to Raft in the order they were drained, so a cell drained twice
    /// lands with its newer state last.
    async fn sync_changed_limits(&self) {
        let mut in_flight = VecDeque::new();
        let mut drained = false;
        loop {
            while !drained && in_flight.len() < SYNC_PIPELINE {
                let cells = self.engine.drain_dirty_limits(SYNC_CELLS, SYNC_BYTES);
                if cells.is_empty() {
                    drained = true;
                    break;
                }
                let n = cells.len();
                metrics::counter!("arbiter_limit_sync_cells_total").increment(n as u64);
                // With spread slots, what fails is sent again (see
                // `send_changed_limits`); a leader deciding every key
                // that fails has lost its leadership, and its successor
                // goes on from the last sync.
                let keys: Vec<String> = if self.slots.spread() {
                    cells.iter().map(|(k, _)| k.clone()).collect()
                } else {
                    Vec::new()
                };
                let request = Request {
                    now_ms: self.time.stamp(),
                    commands: vec![Command::SyncCells {
                        cells,
                        decider: Some(self.view.id()),
                    }],
                    // This process skips its own syncs' cells when applying them.
                    sync_origin: Some(self.boot_id),
                };
                match self.view.raft().client_write_ff(request).await {
                    Ok(committed) => in_flight.push_back((n, keys, committed)),
                    Err(e) => {
                        tracing::warn!(error = %e, cells = n, "rate-limit sync failed");
                        self.requeue(keys, in_flight);
                        return;
                    }
                }
            }
            let Some((n, keys, committed)) = in_flight.pop_front() else {
                return;
            };
            let failed = match committed.await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => format!("refused: {e}"),
                Err(_) => "dropped: raft stopped".to_owned(),
            };
            tracing::warn!(cells = n, "rate-limit sync {failed}");
            self.requeue(keys, in_flight);
            return;
        }
    }

    /// Replicates the circuit breakers changed since the last tick, in
    /// entries of up to [`SYNC_BREAKERS`], one at a time: proposed here as
    /// leader, sent to the leader by an owner that does not lead. A sync
    /// that fails marks its breakers changed again.
    async fn sync_changed_breakers(&self, leading: bool) {
        /// Most breakers in one sync entry.
        const SYNC_BREAKERS: usize = 500;
        let table = self.engine.breakers();
        loop {
            let breakers = table.drain_dirty(SYNC_BREAKERS);
            if breakers.is_empty() {
                return;
            }
            let n = breakers.len();
            metrics::counter!("arbiter_breaker_sync_total").increment(n as u64);
            let names: Vec<String> = breakers.iter().map(|(k, _)| k.clone()).collect();
            let command = Command::SyncBreakers {
                breakers,
                decider: Some(self.view.id()),
            };
            let failed = if leading {
                let request = Request {
                    now_ms: self.time.stamp(),
                    commands: vec![command],
                    sync_origin: Some(self.boot_id),
                };
                self.view
                    .raft()
                    .client_write(request)
                    .await
                    .err()
                    .map(|e| e.to_string())
            } else {
                self.slots
                    .send_sync_command(self.boot_id, command)
                    .await
                    .err()
            };
            if let Some(e) = failed {
                table.mark_dirty(names.iter().map(String::as_str));
                tracing::warn!(error = %e, breakers = n, "circuit breaker sync failed");
                return;
            }
            if n < SYNC_BREAKERS {
                return;
            }
        }
    }

    /// Marks the keys of a failed sync, and of those still in flight
    /// behind it (which may or may not commit), changed again.
    fn requeue<C>(&self, keys: Vec<String>, in_flight: VecDeque<(usize, Vec<String>, C)>) {
        let behind = in_flight.iter().flat_map(|(_, k, _)| k.iter());
        self.engine
            .requeue_dirty_limits(keys.iter().chain(behind).map(String::as_str));
    }
}
