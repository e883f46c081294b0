//! A PostgreSQL server of the harness's own (initdb + pg_ctl in a temporary directory, on a
//! free loopback port), so that it can be restarted under load without disturbing the
//! other tests. The same steps as `scripts/services.sh`, in Rust.
//!
//! Unlike the shared test server, this one keeps `fsync` and `synchronous_commit` on: a
//! restart must not lose what PostgreSQL acknowledged, as in production.
//!
//! Every method blocks (it runs `pg_ctl -w`): call it from `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use edupulse_events::Uuid;

/// initdb refuses to run as root; the server then runs as this system user.
const PG_USER: &str = "postgres";

pub(crate) struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// `Some(PG_USER)` when this process is root.
    user: Option<&'static str>,
    running: bool,
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn bindir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): the fault harness starts \
             and restarts a server of its own. Install the Debian package `postgresql` (scripts/services.sh \
             does it when run as root)."
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    // Output goes to files or nowhere: a pipe inherited by the postmaster would never close.
    let status = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{what} exited with {status}")),
        Err(e) => Err(format!("{what} could not run: {e}")),
    }
}

impl PgServer {
    /// initdb, then start on a free port. Panics, with the server log, when either fails.
    pub(crate) fn start() -> Self {
        let bin = bindir();
        let user = is_root().then_some(PG_USER);
        if user.is_some()
            && !Command::new("id")
                .arg(PG_USER)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            run(
                Command::new("useradd").args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    PG_USER,
                ]),
                "useradd",
            )
            .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("edupulse-harness-pg-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = Self { bin, dir, port, user, running: false };
        if let Some(user) = user {
            run(Command::new("chown").args(["-R", user]).arg(&server.dir), "chown").unwrap();
        }
        // --no-sync only spares initdb's own flush of the template files; the server below
        // runs with fsync on.
        let initdb = server
            .pg("initdb")
            .arg("-D")
            .arg(server.data())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .stdin(Stdio::null())
            .output();
        match initdb {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!("initdb could not run: {e}"),
        }
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c max_connections=100 \
             -c fsync=on -c synchronous_commit=on",
            server.port,
            server.data().display()
        );
        let started = run(
            server
                .pg("pg_ctl")
                .arg("-D")
                .arg(server.data())
                .arg("-l")
                .arg(server.log())
                .args(["-w", "-t", "60", "start", "-o", &options]),
            "pg_ctl start",
        );
        if let Err(e) = started {
            panic!("PostgreSQL did not start: {e}\n{}", server.log_tail());
        }
        server.running = true;
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: running transactions are rolled back, connections closed,
    /// a checkpoint written; then the server starts again with the same options.
    pub(crate) fn restart_fast(&mut self) -> Result<(), String> {
        run(
            self.pg("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.log())
                .args(["-m", "fast", "-w", "-t", "60", "restart"]),
            "pg_ctl restart",
        )
        .map_err(|e| format!("{e}\n{}", self.log_tail()))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A PostgreSQL program, run as the server's user when this process is root.
    fn pg(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.user {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = run(
                self.pg("pg_ctl").arg("-D").arg(&data).args(["-m", "immediate", "-w", "-t", "30", "stop"]),
                "pg_ctl stop",
            );
        }
        remove(&self.dir);
    }
}

fn remove(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}
