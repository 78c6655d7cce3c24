//! A value built from files and rebuilt when they change: certificates
//! rotated by cert-manager, an edited auth file. The files are read every
//! [`RELOAD_EVERY`]; when their bytes differ from the last load, the value
//! is rebuilt. A file that fails to load keeps the last good value and the
//! log says why (once per change). `arbiter_config_generation{what}` counts
//! the loads that took effect and `arbiter_config_reload_failures_total{what}`
//! the changes that were refused.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

/// How often watched files are read for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

type Loader<T> = Box<dyn Fn() -> Result<T, String> + Send + Sync>;
type Lister = Box<dyn Fn() -> Vec<PathBuf> + Send + Sync>;

/// What is watched: fixed files, or whatever a listing returns each time
/// (the files of a directory, which may come and go).
enum Watched {
    Files(Vec<PathBuf>),
    Listing(Lister),
}

pub struct Reloading<T> {
    what: &'static str,
    watched: Watched,
    load: Loader<T>,
    current: RwLock<Arc<T>>,
    /// The files' bytes as last seen (loaded or refused).
    seen: Mutex<Vec<Option<Vec<u8>>>>,
    /// Why the last reload was refused, until one succeeds.
    failed: Mutex<Option<String>>,
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
        let watch = !paths.is_empty();
        Self::begin(what, Watched::Files(paths), watch, Box::new(load))
    }

    /// As `start`, watching the files `list` returns at each look (their
    /// names and bytes), so files added or removed count as changes.
    pub fn start_listing(
        what: &'static str,
        list: impl Fn() -> Vec<PathBuf> + Send + Sync + 'static,
        load: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, String> {
        Self::begin(what, Watched::Listing(Box::new(list)), true, Box::new(load))
    }

    fn begin(
        what: &'static str,
        watched: Watched,
        watch: bool,
        load: Loader<T>,
    ) -> Result<Arc<Self>, String> {
        let seen = watched.read();
        let value = load().map_err(|e| format!("{what}: {e}"))?;
        metrics::gauge!("arbiter_config_generation", "what" => what).set(1.0);
        let this = Arc::new(Self {
            what,
            watched,
            load,
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(seen),
            failed: Mutex::new(None),
        });
        metrics::gauge!("arbiter_config_reload_failing", "what" => what).set(0.0);
        if let (true, Ok(rt)) = (watch, tokio::runtime::Handle::try_current()) {
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

    /// Why the files' current contents were refused, if they were (the
    /// last good value is still in use).
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads if a file changed since the last look; returns whether the
    /// value was replaced.
    pub fn check(&self) -> bool {
        let now = self.watched.read();
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
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                metrics::gauge!("arbiter_config_reload_failing", "what" => self.what).set(0.0);
                metrics::gauge!("arbiter_config_generation", "what" => self.what).increment(1.0);
                tracing::info!(what = self.what, "reloaded");
                true
            }
            Err(e) => {
                metrics::counter!("arbiter_config_reload_failures_total", "what" => self.what)
                    .increment(1);
                metrics::gauge!("arbiter_config_reload_failing", "what" => self.what).set(1.0);
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
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

impl Watched {
    /// The watched files' bytes; a listing's entries carry their names too.
    fn read(&self) -> Vec<Option<Vec<u8>>> {
        match self {
            Watched::Files(paths) => paths.iter().map(|p| std::fs::read(p).ok()).collect(),
            Watched::Listing(list) => list()
                .iter()
                .map(|p| {
                    let mut named = p.as_os_str().as_encoded_bytes().to_vec();
                    named.push(0);
                    named.extend(std::fs::read(p).ok()?);
                    Some(named)
                })
                .collect(),
        }
    }
}
