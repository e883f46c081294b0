//! A TCP proxy in front of a server, to break a client's connection where a test wants it:
//! `stall` stops carrying what clients send (their writes back up, into the client's own
//! queue), `cut` closes every connection the proxy carries (clients see the server go away
//! and connect again, through the proxy, to the same server).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    port: u16,
    stalled: Arc<AtomicBool>,
    /// Bumped by `cut`: every connection older than the value closes.
    cuts: watch::Sender<u64>,
    /// Connections accepted.
    accepted: Arc<AtomicU64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port in front of `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let accepting = tokio::spawn({
            let (stalled, cuts, accepted) = (stalled.clone(), cuts.clone(), accepted.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let cut = cuts.subscribe();
                    tokio::spawn(carry(client, server, stalled.clone(), cut));
                }
            }
        });
        Self { port, stalled, cuts, accepted, accepting }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops carrying what clients send on the connections open now and later (the
    /// server's side still reaches them).
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Closes every open connection, and carries everything again from now on.
    pub fn cut(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cuts.send_modify(|n| *n += 1);
    }
}

/// Carries bytes both ways until either side closes or the proxy cuts the connection.
async fn carry(
    client: TcpStream,
    server: TcpStream,
    stalled: Arc<AtomicBool>,
    mut cut: watch::Receiver<u64>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            if stalled.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
            match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if client_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
        _ = cut.changed() => {}
    }
}
