//! The broker under test: one nats-server (R1 stream), or a JetStream cluster of three
//! (R3 stream) whose stream leader is killed, one of whose members is lost for good, and
//! which is restarted as a whole.

use std::time::Duration;

use crate::common::nats::{NatsCluster, NatsServer};

/// Which broker a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One server; the stream has one replica.
    Single,
    /// Three servers; the stream has three replicas.
    Cluster,
    /// No server: the embedded default's in-process broker (and a SQLite file for the
    /// store), faulted through [`crate::faults::Interrupting`].
    Embedded,
}

pub(crate) enum Broker {
    Single(NatsServer),
    Cluster {
        cluster: NatsCluster,
        /// The member lost for good, once one is.
        lost: Option<usize>,
    },
}

impl Broker {
    /// Starts the servers of `topology`: with `batches`, a nats-server that takes atomic
    /// batches (2.12.1 or later, `EDUPULSE_NATS_SERVER_BATCH_BIN`), else the default one.
    pub(crate) async fn start(topology: Topology, batches: bool) -> Self {
        match (topology, batches) {
            (Topology::Single, false) => Self::Single(NatsServer::start().await),
            (Topology::Single, true) => Self::Single(NatsServer::start_batching().await),
            (Topology::Cluster, false) => Self::Cluster { cluster: NatsCluster::start().await, lost: None },
            (Topology::Cluster, true) => {
                Self::Cluster { cluster: NatsCluster::start_batching().await, lost: None }
            }
            (Topology::Embedded, _) => panic!("the embedded run starts no nats-server"),
        }
    }

    /// The client URL: every member of a cluster.
    pub(crate) fn url(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster { cluster, .. } => cluster.url(),
        }
    }

    /// The stream's replicas.
    pub(crate) fn replicas(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster { .. } => 3,
        }
    }

    /// SIGKILLs the server holding `stream` (a cluster: its current leader), and restarts it
    /// after `pause`. Returns the member killed.
    pub(crate) async fn kill_leader(&mut self, stream: &str, pause: Duration) -> usize {
        match self {
            Self::Single(server) => {
                server.kill().await;
                tokio::time::sleep(pause).await;
                server.restart().await;
                0
            }
            Self::Cluster { cluster, lost } => {
                let leader = cluster.leader_of(stream).await.filter(|i| Some(*i) != *lost);
                // No leader (an election under way): kill any member that runs.
                let victim = leader
                    .or_else(|| (0..cluster.nodes.len()).find(|i| cluster.nodes[*i].is_running()))
                    .unwrap_or(0);
                cluster.nodes[victim].kill().await;
                tokio::time::sleep(pause).await;
                cluster.nodes[victim].restart().await;
                victim
            }
        }
    }

    /// Loses the stream's leader for good (SIGKILL, store deleted, never restarted); the
    /// other two keep a quorum. Once per run; `None` on a single server or after the first.
    pub(crate) async fn lose_member(&mut self, stream: &str) -> Option<usize> {
        let Self::Cluster { cluster, lost } = self else { return None };
        if lost.is_some() {
            return None;
        }
        let victim = cluster.leader_of(stream).await.unwrap_or(0);
        cluster.nodes[victim].lose().await;
        *lost = Some(victim);
        Some(victim)
    }

    /// A single server only: SIGKILL, copy its store, restart; `gap` later SIGKILL again,
    /// put the copy back and restart. Whatever it acknowledged during the gap is lost, as
    /// when a server loses power before its sync (or is restored from a backup). Returns
    /// false against a cluster (nothing done).
    pub(crate) async fn restore_older_copy(&mut self, gap: Duration) -> bool {
        let Self::Single(server) = self else { return false };
        server.kill().await;
        let backup = server.dir().with_extension("older");
        let copied = std::process::Command::new("cp").arg("-a").arg(server.dir()).arg(&backup).status();
        assert!(copied.is_ok_and(|s| s.success()), "the harness could not copy the broker's store");
        server.restart().await;
        tokio::time::sleep(gap).await;
        server.kill().await;
        std::fs::remove_dir_all(server.dir()).expect("the broker's store is removed");
        std::fs::rename(&backup, server.dir()).expect("the older copy is put back");
        server.restart().await;
        true
    }

    /// SIGKILLs every running member, waits `pause`, and starts them again (the lost one
    /// stays lost). A single server is killed and restarted.
    pub(crate) async fn restart_all(&mut self, pause: Duration) {
        match self {
            Self::Single(server) => {
                server.kill().await;
                tokio::time::sleep(pause).await;
                server.restart().await;
            }
            Self::Cluster { cluster, lost } => {
                let running: Vec<usize> =
                    (0..cluster.nodes.len()).filter(|i| cluster.nodes[*i].is_running()).collect();
                for &i in &running {
                    cluster.nodes[i].kill().await;
                }
                tokio::time::sleep(pause).await;
                for i in (0..cluster.nodes.len()).filter(|i| Some(*i) != *lost) {
                    if !cluster.nodes[i].is_running() {
                        cluster.nodes[i].restart().await;
                    }
                }
            }
        }
    }
}
