//! An ephemeral Redis without persistence: one shared per test run, or a dedicated one that a
//! test may kill to see how its code copes.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::watchdog::{self, NotReady};

/// A running redis-server.
#[derive(Debug, Clone)]
pub struct Redis {
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
    dir: Option<std::path::PathBuf>,
}

static SHARED: OnceLock<Result<Redis, String>> = OnceLock::new();

impl Redis {
    /// The server this test run shares: `KEEL_TEST_REDIS_URL` if set, else one started (once
    /// per process) for this process.
    pub fn shared() -> Result<Redis, String> {
        SHARED
            .get_or_init(|| match std::env::var("KEEL_TEST_REDIS_URL") {
                Ok(url) => Ok(Redis { url, dir: None }),
                Err(_) => Redis::start(std::process::id()).map_err(|e| format!("{e:#}")),
            })
            .clone()
    }

    /// A server for one test alone, which it may [`Redis::kill`].
    pub async fn dedicated() -> Redis {
        tokio::task::spawn_blocking(|| Redis::start(std::process::id()))
            .await
            .expect("start redis-server")
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A server for one test alone on `port` (one a test handed out as Redis's before it ran,
    /// say, to show what a process does until Redis comes).
    pub async fn dedicated_at(port: u16) -> Redis {
        tokio::task::spawn_blocking(move || Redis::start_at(std::process::id(), port))
            .await
            .expect("start redis-server")
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts a server that lives as long as process `watch_pid`, on a free port (another, when
    /// the one it was given was taken before it could bind it).
    pub fn start(watch_pid: u32) -> anyhow::Result<Redis> {
        Ok(Redis::start_free(watch_pid, "")?.0)
    }

    /// [`Redis::start`] with the further `options`; the server and its port. A cluster node
    /// also binds its port + 10000 (the cluster bus), which may be the one that was taken.
    pub(crate) fn start_free(watch_pid: u32, options: &str) -> anyhow::Result<(Redis, u16)> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = watchdog::free_port()?;
            match Redis::start_with(watch_pid, port, options) {
                Err(e) if attempts < 3 && e.downcast_ref().is_some_and(NotReady::port_taken) => {}
                started => return started.map(|redis| (redis, port)),
            }
        }
    }

    /// Starts a server on `port` that lives as long as process `watch_pid`.
    pub fn start_at(watch_pid: u32, port: u16) -> anyhow::Result<Redis> {
        Redis::start_with(watch_pid, port, "")
    }

    /// Starts a server on `port` with the further `options` (redis-server's command line) that
    /// lives as long as process `watch_pid`.
    pub(crate) fn start_with(watch_pid: u32, port: u16, options: &str) -> anyhow::Result<Redis> {
        let binary = watchdog::find_binary("redis-server", &[]).ok_or_else(|| {
            anyhow::anyhow!("redis-server not found on PATH: apt-get install -y redis-server")
        })?;
        let dir = watchdog::temp_dir("redis")?;
        let command = format!(
            "{} --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir '{}' {options}",
            binary.display(),
            dir.display()
        );
        watchdog::spawn(&command, &dir, watch_pid, "TERM", None)?;
        watchdog::until_ready(&dir, Duration::from_secs(30), || ping(port))
            .map_err(|why| anyhow::Error::new(why).context("redis-server did not start"))?;
        Ok(Redis {
            url: format!("redis://127.0.0.1:{port}"),
            dir: Some(dir),
        })
    }

    /// Kills the server with SIGKILL, as a crash would. Only for servers this process started.
    pub fn kill(&self) {
        self.signal("KILL");
    }

    /// Kills the server (SIGKILL) and starts another, empty, on its port: a Redis that
    /// restarted without persistence, or failed over to a replica that had nothing.
    pub async fn restart_empty(&self) -> Redis {
        self.kill();
        let port: u16 = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the URL");
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while ping(port) {
                assert!(Instant::now() < deadline, "redis-server outlived SIGKILL");
                std::thread::sleep(Duration::from_millis(10));
            }
            Redis::start_at(std::process::id(), port)
        })
        .await
        .expect("start redis-server")
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Stops the server (SIGSTOP): it keeps its data and its connections but answers nothing
    /// until [`Redis::resume`], as a hung or partitioned Redis would.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server answer again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let dir = self
            .dir
            .as_ref()
            .expect("only a server this process started can be signalled");
        let pid = std::fs::read_to_string(dir.join("server.pid")).expect("server.pid");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), pid.trim()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} redis-server {pid}");
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// The shared Redis's URL and a key prefix no other test uses.
pub async fn fresh_prefix() -> (String, String) {
    let server = tokio::task::spawn_blocking(Redis::shared)
        .await
        .expect("start redis-server")
        .unwrap_or_else(|e| panic!("{e}"));
    (server.url, format!("t{}:", uuid::Uuid::new_v4().simple()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_already_taken_is_told_at_once_for_a_start_on_another() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let refused = Redis::start_at(std::process::id(), port).expect_err("the port is taken");
        let why = refused.downcast_ref::<NotReady>();
        assert!(why.is_some_and(NotReady::port_taken), "{refused:#}");
    }
}
