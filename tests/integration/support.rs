//! Starting and stopping a real server, and polling with deadlines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::proto::idempotency_client::IdempotencyClient;
use arbiter::proto::leases_client::LeasesClient;
use arbiter::proto::rate_limiter_client::RateLimiterClient;
use tonic::transport::Channel;

pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub data_dir: PathBuf,
    /// Whether dropping this server removes its data directory.
    owns_dir: bool,
    /// The newest lines of its log (at most `LOG_LINES`).
    log: Arc<Mutex<VecDeque<String>>>,
}

const LOG_LINES: usize = 1000;

/// A fresh, empty directory for a server's data (not removed automatically).
pub fn fresh_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "arbiter-it-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Server {
    /// Starts `arbiter serve` with JSON logs on 127.0.0.1:0 ports and waits
    /// (up to the deadline) for the line announcing the bound addresses.
    pub fn start(extra: &[&str]) -> Server {
        let mut s = Self::start_in(&fresh_dir(), extra);
        s.owns_dir = true;
        s
    }

    /// Starts a server on `data_dir` (which it leaves in place on drop).
    pub fn start_in(data_dir: &std::path::Path, extra: &[&str]) -> Server {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// As [`Server::start_in`], its wall clock shifted by the offset in
    /// `clock_file` (a test-only hook, `ARBITER_TEST_CLOCK_FILE`).
    pub fn start_with_clock(
        data_dir: &std::path::Path,
        extra: &[&str],
        clock_file: &std::path::Path,
    ) -> Server {
        let file = clock_file.to_string_lossy();
        Self::start_with_env(data_dir, extra, &[("ARBITER_TEST_CLOCK_FILE", &file)])
    }

    /// Starts one whose files may not grow past `bytes` (RLIMIT_FSIZE, with
    /// SIGXFSZ ignored, so a write beyond it fails with EFBIG as a write to
    /// a full disk fails with ENOSPC).
    pub fn start_with_file_size_limit(extra: &[&str], bytes: u64) -> Server {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(env!("CARGO_BIN_EXE_arbiter"));
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setrlimit, signal) are made, and nothing is allocated.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut s = Self::spawn(command, &fresh_dir(), extra, &[]);
        s.owns_dir = true;
        s
    }

    pub fn start_with_env(
        data_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_arbiter")),
            data_dir,
            extra,
            env,
        )
    }

    fn spawn(
        mut command: Command,
        data_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let data_dir = data_dir.to_path_buf();
        let mut child = command
            .arg("serve")
            .args(if extra.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .args(if extra.contains(&"--peer-listen") {
                &[][..]
            } else {
                &["--peer-listen", "127.0.0.1:0"][..]
            })
            .env_remove("ARBITER_LISTEN")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn arbiter");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                    if kept.len() == LOG_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line.clone());
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["fields"]["message"] == "arbiter serving" {
                        let addr = |k: &str| {
                            v["fields"][k]
                                .as_str()
                                .unwrap_or_default()
                                .parse::<SocketAddr>()
                        };
                        if let (Ok(a), Ok(m)) = (addr("client"), addr("metrics")) {
                            let _ = tx.send((a, m));
                        }
                    }
                }
                // Keep draining so the server never blocks on a full pipe.
                if std::env::var_os("ARBITER_TEST_LOGS").is_some() {
                    eprintln!("{line}");
                }
            }
        });
        let (addr, metrics) = match rx.recv_timeout(DEADLINE) {
            Ok(addrs) => addrs,
            Err(_) => {
                let exited = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                let tail: Vec<String> = {
                    let log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.iter().rev().take(20).rev().cloned().collect()
                };
                panic!(
                    "server did not announce its address within {DEADLINE:?} \
                     (exited: {exited:?}); its last log lines:\n{}",
                    tail.join("\n")
                )
            }
        };
        Server {
            child,
            addr,
            metrics,
            data_dir,
            owns_dir: false,
            log,
        }
    }

    /// The newest lines it logged.
    pub fn log(&self) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
            .connect()
            .await
            .expect("connect to arbiter")
    }

    /// A connection with `options` (TLS: `https://` to the client port).
    pub async fn conn(
        &self,
        options: &arbiter::security::ClientOptions,
    ) -> arbiter::security::Conn {
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}", self.addr);
        eventually("a connection", || async {
            arbiter::security::connect(&url, options).await.ok()
        })
        .await
    }

    pub async fn limits(&self) -> RateLimiterClient<Channel> {
        RateLimiterClient::new(self.channel().await)
    }

    pub async fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel().await)
    }

    pub async fn idem(&self) -> IdempotencyClient<Channel> {
        IdempotencyClient::new(self.channel().await)
    }

    /// Sends SIGTERM and waits (up to the deadline) for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        self.wait_exit()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < until,
                "server did not exit within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// Polls `probe` until it returns Some, failing after the deadline.
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, probe).await
}

/// [`eventually`] with its own deadline, for conditions that take longer
/// than [`DEADLINE`] by design (large state moving between processes).
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one series (`name{labels}` exactly as rendered) on a
/// node's plaintext metrics endpoint, if it is there.
pub fn metric(metrics: std::net::SocketAddr, series: &str) -> Option<f64> {
    let body = http_get(metrics, "/metrics");
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// `GET path` over HTTP/1.1, retried on connection errors until the deadline.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let once = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(DEADLINE))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        match once() {
            Ok(out) if !out.is_empty() => return out,
            other => assert!(std::time::Instant::now() < until, "GET {path}: {other:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A server running inside the test process on a clock the test moves, so
/// time-based behaviour (lease expiry, lock lapse, window roll-over) is
/// tested without waiting for the wall clock.
pub struct InProcess {
    pub addr: SocketAddr,
    pub clock: std::sync::Arc<arbiter::clock::ManualClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    data_dir: PathBuf,
}

/// Where manual clocks start: a whole number of days since the epoch, so
/// fixed windows of a second, a minute or a day start exactly there.
pub const MANUAL_START_MS: u64 = 20_000 * 86_400_000;

impl InProcess {
    /// A single node on 127.0.0.1:0 ports, its clock at [`MANUAL_START_MS`].
    pub async fn start() -> InProcess {
        Self::start_in(fresh_dir(), MANUAL_START_MS).await
    }

    /// A single node on `data_dir` (removed when this is dropped), its
    /// clock at `start_ms`.
    pub async fn start_in(data_dir: PathBuf, start_ms: u64) -> InProcess {
        Self::try_start_in(data_dir, start_ms)
            .await
            .expect("server starts")
    }

    async fn try_start_in(
        data_dir: PathBuf,
        start_ms: u64,
    ) -> Result<InProcess, arbiter::server::ServerError> {
        let clock = std::sync::Arc::new(arbiter::clock::ManualClock::new(start_ms));
        let config = arbiter::config::Config::for_tests(data_dir.clone());
        let started = arbiter::server::start(config, clock.clone()).await?;
        let addr = started.addrs.client;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            started
                .serve_until(async {
                    let _ = stopped.await;
                })
                .await
                .expect("server stops cleanly");
        });
        Ok(InProcess {
            addr,
            clock,
            stop: Some(stop),
            served: Some(served),
            data_dir,
        })
    }

    pub fn advance(&self, ms: u64) {
        self.clock.advance(ms);
    }

    /// Steps the wall clock (as NTP or an operator might) without time
    /// passing.
    pub fn step_wall_clock(&self, by_ms: i64) {
        let now = arbiter::clock::Clock::wall_ms(&*self.clock);
        self.clock.set(now.saturating_add_signed(by_ms));
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
            .connect()
            .await
            .expect("connect to arbiter")
    }

    /// Shuts the server down cleanly and starts it again on the same data
    /// directory, its clock where this one's was.
    pub async fn restart(mut self) -> InProcess {
        let (dir, now) = (
            self.data_dir.clone(),
            arbiter::clock::Clock::wall_ms(&*self.clock),
        );
        self.shut_down().await;
        // Keep the directory for the next start.
        self.data_dir = PathBuf::new();
        // Raft's state-machine task lets go of the store just after Raft
        // has stopped: poll until the file is free.
        eventually("the data directory to be released", || {
            let dir = dir.clone();
            async move { Self::try_start_in(dir, now).await.ok() }
        })
        .await
    }

    /// Shuts the server down and waits for it (up to the deadline).
    pub async fn stop(mut self) {
        self.shut_down().await;
    }

    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            tokio::time::timeout(DEADLINE, served)
                .await
                .expect("server stopped within the deadline")
                .expect("server task did not panic");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if !self.data_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// Runs `arbiter serve` on `dir` (with `extra` flags) expecting it to refuse to start: returns
/// its exit status and stderr (killing it if it is still up at the
/// deadline).
pub fn refused_start(dir: &std::path::Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--peer-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn arbiter");
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a server on a damaged data directory kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// Sends `sig` (as `kill` spells it: `-STOP`, `-CONT`) to the server's
/// process.
pub fn signal(s: &Server, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &s.pid().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}
