//! The node's background loops: spawned, owned and joined in one place.
//!
//! Every loop ends when told to stop ([`Tasks::stop`], after the gRPC
//! server has drained its calls, so the proposer is still there for the
//! last of them), and the node waits for each before stopping Raft.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long stopping waits for a loop before abandoning it.
const STOP_WAIT: Duration = Duration::from_secs(5);

pub struct Tasks {
    running: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
    stop: watch::Sender<bool>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self {
            running: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
        }
    }
}

impl Tasks {
    /// Runs `task` until [`Tasks::stop`]: it should end when
    /// [`Tasks::stopping`] says so; if it has not ended [`STOP_WAIT`] later
    /// it is aborted.
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|(_, h)| !h.is_finished());
        running.push((name, handle));
    }

    /// Resolves once the loops are told to stop.
    pub async fn stopping(&self) {
        self.signal().wait().await;
    }

    /// What a loop keeps to learn that it must stop.
    pub fn signal(&self) -> Stopping {
        Stopping(self.stop.subscribe())
    }

    /// Tells every loop to stop and waits for each (in the order spawned).
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, mut handle) in running {
            match tokio::time::timeout(STOP_WAIT, &mut handle).await {
                Ok(Ok(())) => tracing::debug!(task = name, "stopped"),
                Ok(Err(e)) => tracing::warn!(task = name, error = %e, "task failed"),
                Err(_) => {
                    tracing::warn!(task = name, "task did not stop in time: aborted");
                    handle.abort();
                }
            }
        }
    }
}

/// Says when the loops are told to stop (see [`Tasks::signal`]).
#[derive(Clone)]
pub struct Stopping(watch::Receiver<bool>);

impl Stopping {
    /// Resolves once the loops are told to stop.
    pub async fn wait(&self) {
        let mut stop = self.0.clone();
        // An error means the sender is gone, which is a stop too.
        let _ = stop.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn stop_waits_for_every_loop_to_end() {
        let tasks = Arc::new(Tasks::default());
        let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..3 {
            let (t, ended) = (tasks.clone(), ended.clone());
            tasks.spawn("loop", async move {
                t.stopping().await;
                ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        assert_eq!(ended.load(std::sync::atomic::Ordering::SeqCst), 0);
        tasks.stop().await;
        assert_eq!(ended.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
