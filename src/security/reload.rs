//! A value built from files and rebuilt when they change: certificates
//! rotated by cert-manager, an edited auth file. The files are read every
//! [`RELOAD_EVERY`]; when their bytes differ from the last load, the value
//! is rebuilt. A file that fails to load keeps the last good value and the
//! log says why (once per change).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

/// How often watched files are read for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

type Loader<T> = Box<dyn Fn() -> Result<T, String> + Send + Sync>;

pub struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    load: Loader<T>,
    current: RwLock<Arc<T>>,
    /// The files' bytes as last seen (loaded or refused).
    seen: Mutex<Vec<Option<Vec<u8>>>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads the value (an error here is the caller's to report) and, when
    /// there are files to watch and this runs inside a Tokio runtime,
    /// watches them until the value is dropped.
    pub fn start(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, String> {
        let seen = Self::read(&paths);
        let value = load().map_err(|e| format!("{what}: {e}"))?;
        let this = Arc::new(Self {
            what,
            paths,
            load: Box::new(load),
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(seen),
        });
        if let (false, Ok(rt)) = (this.paths.is_empty(), tokio::runtime::Handle::try_current()) {
            rt.spawn(Self::watch(Arc::downgrade(&this)));
        }
        Ok(this)
    }

    /// The value as last loaded.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn read(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
        paths.iter().map(|p| std::fs::read(p).ok()).collect()
    }

    /// Reloads if a file changed since the last look; returns whether the
    /// value was replaced.
    pub fn check(&self) -> bool {
        let now = Self::read(&self.paths);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match (self.load)() {
            Ok(v) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
                tracing::info!(what = self.what, "reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "cannot reload; keeping the last good one");
                false
            }
        }
    }

    async fn watch(this: Weak<Self>) {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(this) = this.upgrade() else { return };
            // Reading files blocks; keep it off the event loop.
            let _ = tokio::task::spawn_blocking(move || this.check()).await;
        }
    }
}
