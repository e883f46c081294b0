//! A nats-server of a test's own, so that the test can stop, kill and restart it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edupulse_events::wire::{WireEnvelope, headers};
use edupulse_events::{NatsConfig, NatsPublisher, StreamSpec};

pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Extra command-line arguments (authorization, for example).
    args: Vec<String>,
}

fn binary() -> PathBuf {
    if let Ok(bin) = std::env::var("EDUPULSE_NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "nats-server is not installed: this test starts and stops its own JetStream server. \
         Run `bash scripts/test.sh`, which installs it, or set EDUPULSE_NATS_SERVER_BIN."
    )
}

impl NatsServer {
    /// Starts a JetStream server on a free loopback port with a store directory of its own.
    pub async fn start() -> Self {
        Self::start_with_args(&[]).await
    }

    /// The same, with extra arguments (`["--user", "u", "--pass", "p"]`).
    pub async fn start_with_args(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir =
            std::env::temp_dir().join(format!("edupulse-nats-{}", edupulse_events::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        let mut server = Self { bin: binary(), port, dir, child: None, args };
        server.restart().await;
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the process on the same port and store directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("nats-server did not start on port {}", self.port);
    }

    /// Kills the process (SIGKILL): an outage, not a clean shutdown.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub const STREAM: &str = "EDUPULSE_TEST";

/// A publisher with a short acknowledgement timeout and the test stream (`courses.>` and
/// `tenant-42.courses.>`).
pub async fn publisher(server: &NatsServer) -> NatsPublisher {
    publisher_with(server, NatsConfig::default()).await
}

/// The same, with `config` (its acknowledgement timeout shortened as above).
pub async fn publisher_with(server: &NatsServer, config: NatsConfig) -> NatsPublisher {
    let config = config.with_ack_timeout(Duration::from_millis(800));
    let publisher = NatsPublisher::connect(&server.url(), config).await.unwrap();
    publisher.ensure_stream(&StreamSpec::new(STREAM, ["courses.>", "tenant-42.courses.>"])).await.unwrap();
    publisher
}

/// One stored message.
pub struct Stored {
    pub subject: String,
    pub event_id: String,
    pub wire: WireEnvelope,
}

/// Every message in the test stream, in stream order.
pub async fn stream_messages(publisher: &NatsPublisher) -> Vec<Stored> {
    let mut stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.unwrap();
        let event_id =
            message.headers.get(headers::MSG_ID).map(|v| v.as_str().to_owned()).unwrap_or_default();
        let wire: WireEnvelope = serde_json::from_slice(&message.payload).unwrap();
        out.push(Stored { subject: message.subject.to_string(), event_id, wire });
    }
    out
}
