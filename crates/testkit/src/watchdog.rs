//! Starting a server process that stops itself, and cleans its directory, when a watched
//! process exits — even on SIGKILL, so no test run leaves servers behind.

use std::path::Path;
use std::process::{Command, Stdio};

/// Starts `command` (a shell command line) under a watchdog shell, optionally as `user`. When
/// process `watch_pid` is gone, the watchdog stops the server with `stop_signal` and removes
/// `dir`. A server that exits on its own (a failed start, a test's SIGKILL) leaves `dir` as it
/// was until then, so that whoever started it can read why and start it again. The server's
/// pid is written to `dir/server.pid`, its output to `dir/server.log`, and once it has ended,
/// its exit status to `dir/server.exit`.
pub fn spawn(
    command: &str,
    dir: &Path,
    watch_pid: u32,
    stop_signal: &str,
    user: Option<&str>,
) -> anyhow::Result<()> {
    // What an earlier start in `dir` left says nothing of this one.
    let _ = std::fs::remove_file(dir.join("server.exit"));
    let dir = dir.display();
    // `/proc/<pid>` works across users, unlike `kill -0`. The sleep is the watchdog's own tick,
    // not a test waiting for something.
    let script = format!(
        r#"
{command} >"{dir}/server.log" 2>&1 &
server=$!
echo $server >"{dir}/server.pid"
while [ -d /proc/{watch_pid} ] && kill -0 $server 2>/dev/null; do sleep 0.5; done
kill -{stop_signal} $server 2>/dev/null
wait $server 2>/dev/null
echo $? >"{dir}/server.exit"
while [ -d /proc/{watch_pid} ]; do sleep 0.5; done
rm -rf "{dir}"
"#
    );
    let mut shell = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "sh", "-c", &script]);
            c
        }
        None => {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        }
    };
    shell
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(())
}

/// Whether this process runs as root (PostgreSQL refuses to).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// Why a server did not become ready, with its log.
#[derive(Debug)]
pub enum NotReady {
    /// It exited.
    Exited(String),
    /// It did not answer within the wait.
    Late(String),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Exited(log) => write!(f, "it exited at start:\n{log}"),
            NotReady::Late(log) => write!(f, "it did not answer in time:\n{log}"),
        }
    }
}

impl std::error::Error for NotReady {}

impl NotReady {
    /// Whether it exited because its port was taken (between [`free_port`] and its bind, by
    /// another test's server or the local end of any connection): worth a start on another.
    pub fn port_taken(&self) -> bool {
        matches!(self, NotReady::Exited(log)
            if log.contains("could not bind") || log.contains("Address already in use"))
    }
}

/// Polls `ready` (every 20 ms, for at most `within`) until it says so, or the server
/// [`spawn`]ed in `dir` has exited.
pub fn until_ready(
    dir: &Path,
    within: std::time::Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), NotReady> {
    let deadline = std::time::Instant::now() + within;
    let log = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    loop {
        if ready() {
            return Ok(());
        }
        if dir.join("server.exit").exists() {
            return Err(NotReady::Exited(log()));
        }
        if std::time::Instant::now() > deadline {
            return Err(NotReady::Late(log()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A fresh temporary directory under the system temp dir. Directories that earlier runs left
/// behind (their watchdog was killed before it could clean up: a PostgreSQL data dir holds
/// gigabytes after a full suite) are removed first.
pub fn temp_dir(kind: &str) -> anyhow::Result<std::path::PathBuf> {
    sweep_stale(&std::env::temp_dir());
    let dir = std::env::temp_dir().join(format!(
        "keel-testkit-{kind}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Removes `keel-testkit-*` directories under `root` whose creating process and server are
/// both gone.
fn sweep_stale(root: &Path) {
    let alive = |pid: &str| !pid.is_empty() && Path::new("/proc").join(pid).exists();
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("keel-testkit-") else {
            continue;
        };
        // keel-testkit-<kind>-<pid>-<uuid>, where a kind may hold a dash (`pg-replica`) and the
        // uuid holds none: the pid is the second field from the end. Read from the front, a
        // replica's "pid" was `replica`, never alive: any test making a directory removed a
        // replica's copy between its base backup and its start (CI, and one local run before).
        let Some(owner) = rest.rsplit('-').nth(1) else {
            continue;
        };
        let server = std::fs::read_to_string(entry.path().join("server.pid")).unwrap_or_default();
        if !alive(owner) && !alive(server.trim()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The first of `names` found on PATH or under `/usr/lib/postgresql/*/bin` (newest first).
pub fn find_binary(name: &str, extra_dirs: &[std::path::PathBuf]) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_exits_on_its_own_leaves_its_log_and_status() {
        let dir = temp_dir("watchdog").unwrap();
        spawn(
            "sh -c 'echo no such setting; exit 3'",
            &dir,
            std::process::id(),
            "TERM",
            None,
        )
        .unwrap();
        let exit = dir.join("server.exit");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !exit.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no exit status written"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(std::fs::read_to_string(&exit).unwrap().trim(), "3");
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
        assert_eq!(log.trim(), "no such setting", "kept for whoever started it");
    }

    #[test]
    fn directories_of_dead_runs_are_swept_and_live_ones_kept() {
        let root = tempfile_root();
        // No process has pid 4194305: above the kernel's largest pid_max.
        let dead = root.join("keel-testkit-pg-4194305-abc");
        let live = root.join(format!("keel-testkit-pg-{}-def", std::process::id()));
        // A kind with a dash in its name, its server not started yet.
        let replica = root.join(format!(
            "keel-testkit-pg-replica-{}-ghi",
            std::process::id()
        ));
        std::fs::create_dir_all(&replica).unwrap();
        for dir in [&dead, &live] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("server.pid"), "4194306\n").unwrap();
        }
        sweep_stale(&root);
        assert!(!dead.exists(), "the dead run's directory is removed");
        assert!(live.exists(), "this process's directory stays");
        assert!(
            replica.exists(),
            "and so does its replica's, before it has a server"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn tempfile_root() -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("sweep-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root).unwrap();
        root
    }
}
