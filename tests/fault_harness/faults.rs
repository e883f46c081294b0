//! The faults: relays aborted mid-batch and respawned, nats-server (a cluster: the stream's
//! leader) killed with SIGKILL while a relay is mid-batch and restarted, PostgreSQL
//! restarted (fast shutdown); against a cluster, also one member lost for good and the whole
//! cluster restarted; on the embedded default, relays aborted and the in-process broker
//! made unavailable (mid-batch or not) for a while. Which fault comes when is drawn from
//! the seed before the run starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use edupulse_events::wire::OutgoingMessage;
use edupulse_events::{
    BoxFuture, EventError, EventStore, InMemoryBroker, LogRelay, PublishReceipt, Publisher, RelayConfig,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::{Broker, Topology};
use crate::postgres::PgServer;
use crate::prng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Abort relay `slot` (wherever it is: mid-batch, waiting on an ack, idle) and start a
    /// new one after `pause`.
    KillRelay { slot: usize, pause: Duration },
    /// SIGKILL nats-server (a cluster: the stream's leader) while a relay waits on the
    /// broker, or (`after_ack`) the moment a relay got a batch's acknowledgements back;
    /// restart it after `pause`.
    KillNats { pause: Duration, after_ack: bool },
    /// `pg_ctl restart -m fast`.
    RestartPostgres,
    /// A cluster only: SIGKILL the stream's leader and delete its store, never to come back.
    LoseMember,
    /// A cluster only: SIGKILL every member, start them again after `pause`.
    RestartCluster { pause: Duration },
    /// One server only: the stream goes back to a copy taken `gap` earlier (what it
    /// acknowledged meanwhile is lost, as in a power cut before a sync); the relays must find
    /// it and send it again.
    RestoreOlder { gap: Duration },
    /// The embedded default only: the in-process broker refuses every publish (unavailable)
    /// for `pause`, from the middle of a relay's batch (`mid_batch`: its first messages
    /// acknowledged, the rest refused) or from whenever it comes.
    BrokerOutage { pause: Duration, mid_batch: bool },
}

impl Fault {
    /// The fault's name in `TORTURE_SKIP`.
    fn name(self) -> &'static str {
        match self {
            Self::KillRelay { .. } => "relay-kill",
            Self::KillNats { .. } => "nats-kill",
            Self::RestartPostgres => "pg-restart",
            Self::LoseMember => "member-loss",
            Self::RestartCluster { .. } => "cluster-restart",
            Self::RestoreOlder { .. } => "restore-older",
            Self::BrokerOutage { .. } => "broker-outage",
        }
    }
}

/// The faults of a run of `duration`, at offsets from its start: drawn in rounds of five
/// (two relay kills, two broker kills, one database restart, shuffled), 1.5 to 4 s apart,
/// so that even a short run has every kind. Against a cluster, a round has one relay kill,
/// two leader kills, one database restart and one restart of the whole cluster, and the
/// first fault after a third of the run loses a member for good. On the embedded default,
/// a round has two relay kills and three outages of the in-process broker (two from
/// the middle of a batch). Kinds named in
/// `skip` (`relay-kill`, `nats-kill`, `pg-restart`, `member-loss`, `cluster-restart`,
/// `broker-outage`) are left out, their slots left empty.
pub(crate) fn schedule(
    seed: u64,
    duration: Duration,
    relays: usize,
    skip: &[String],
    topology: Topology,
) -> Vec<(Duration, Fault)> {
    let skipped = |name: &str| skip.iter().any(|s| s == name);
    let mut rng = Rng::derive(seed, 1);
    let mut out = Vec::new();
    let mut at = Duration::from_millis(rng.between(1000, 3000));
    // Leave the last two seconds without a new fault: the run ends with servers that are up.
    let last = duration.saturating_sub(Duration::from_secs(2));
    let mut member_lost = false;
    'rounds: loop {
        let mut round = match topology {
            Topology::Single => [0u8, 0, 1, 1, 2],
            Topology::Cluster => [0u8, 1, 1, 2, 3],
            Topology::Embedded => [0u8, 0, 4, 4, 5],
        };
        for i in (1..round.len()).rev() {
            round.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for kind in round {
            if at > last {
                break 'rounds;
            }
            let fault = match kind {
                0 => Fault::KillRelay {
                    slot: rng.below(relays as u64) as usize,
                    pause: Duration::from_millis(rng.between(0, 800)),
                },
                1 => Fault::KillNats {
                    pause: Duration::from_millis(rng.between(200, 2500)),
                    after_ack: rng.below(2) == 1,
                },
                2 => Fault::RestartPostgres,
                3 => Fault::RestartCluster { pause: Duration::from_millis(rng.between(200, 2500)) },
                _ => Fault::BrokerOutage {
                    pause: Duration::from_millis(rng.between(200, 2500)),
                    mid_batch: kind == 4,
                },
            };
            if topology == Topology::Single && !member_lost && at >= duration / 2 {
                // Once, half-way: the server loses what it acknowledged over a few seconds.
                member_lost = true;
                let restore = Fault::RestoreOlder { gap: Duration::from_millis(rng.between(3000, 5000)) };
                if !skipped(restore.name()) {
                    out.push((at, restore));
                    at += Duration::from_millis(rng.between(1500, 4000));
                    continue;
                }
            }
            if topology == Topology::Cluster && !member_lost && at >= duration / 3 {
                member_lost = true;
                if !skipped(Fault::LoseMember.name()) {
                    out.push((at, Fault::LoseMember));
                    at += Duration::from_millis(rng.between(1500, 4000));
                    continue;
                }
            }
            if !skipped(fault.name()) {
                out.push((at, fault));
            }
            at += Duration::from_millis(rng.between(1500, 4000));
        }
    }
    out
}

/// The broker as one kind of relay sees it, counting the acknowledgements it got: which
/// relays published at all (the bus's, the standalone ones) goes into the report.
pub(crate) struct Counting {
    inner: Arc<dyn Publisher>,
    acked: AtomicU64,
    /// Batches handed to the broker whose acknowledgements are not all back.
    in_flight: AtomicU64,
    /// Batches that got at least one acknowledgement back.
    acked_batches: AtomicU64,
    /// Acknowledgements of messages sent in JetStream's fast-ingest batches (a receipt
    /// from a stream without its own sequence: the batch names its last message's only).
    acked_fast: AtomicU64,
}

impl Counting {
    pub(crate) fn new(inner: Arc<dyn Publisher>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            acked: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            acked_batches: AtomicU64::new(0),
            acked_fast: AtomicU64::new(0),
        })
    }

    /// Acknowledgements so far, duplicates included.
    pub(crate) fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// A relay publishing through this one waits on the broker now.
    pub(crate) fn mid_batch(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Batches acknowledged so far.
    pub(crate) fn acked_batches(&self) -> u64 {
        self.acked_batches.load(Ordering::Relaxed)
    }

    /// Messages acknowledged in fast-ingest batches so far.
    pub(crate) fn acked_fast(&self) -> u64 {
        self.acked_fast.load(Ordering::Relaxed)
    }
}

impl Publisher for Counting {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            let outcomes = self.inner.publish(messages).await;
            if outcomes.iter().any(Result::is_ok) {
                self.acked_batches.fetch_add(1, Ordering::Relaxed);
            }
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.acked.fetch_add(outcomes.iter().filter(|o| o.is_ok()).count() as u64, Ordering::Relaxed);
            let fast = outcomes
                .iter()
                .filter(|o| o.as_ref().is_ok_and(|r| r.stream.is_some() && r.stream_sequence == 0))
                .count();
            self.acked_fast.fetch_add(fast as u64, Ordering::Relaxed);
            outcomes
        })
    }

    edupulse_events::forward_publisher!(inner);
}

/// The embedded default's in-process broker as the relays see it, with a fault of its own
/// to inject: armed, the next batch of two messages or more gets its first half stored and
/// acknowledged, then the broker becomes unavailable (its own switch) and refuses the rest.
/// A relay then holds acknowledgements for part of a batch and failures for the rest, as
/// when a nats-server dies mid-batch.
pub(crate) struct Interrupting {
    broker: InMemoryBroker,
    armed: AtomicBool,
    /// Batches interrupted so far.
    interrupted: AtomicU64,
}

impl Interrupting {
    pub(crate) fn new(broker: InMemoryBroker) -> Arc<Self> {
        Arc::new(Self { broker, armed: AtomicBool::new(false), interrupted: AtomicU64::new(0) })
    }

    /// The broker (its stored messages, its availability switch).
    pub(crate) fn broker(&self) -> &InMemoryBroker {
        &self.broker
    }

    fn interrupted(&self) -> u64 {
        self.interrupted.load(Ordering::SeqCst)
    }
}

impl Publisher for Interrupting {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            if messages.len() < 2 || !self.armed.swap(false, Ordering::SeqCst) {
                return self.broker.publish(messages).await;
            }
            let (first, rest) = messages.split_at(messages.len() / 2);
            let mut outcomes = self.broker.publish(first).await;
            self.broker.set_available(false);
            self.interrupted.fetch_add(1, Ordering::SeqCst);
            outcomes.extend(self.broker.publish(rest).await);
            outcomes
        })
    }

    edupulse_events::forward_publisher!(broker);
}

/// What the faults act on: the servers of a run, or the embedded default's broker.
pub(crate) enum Target<'a> {
    Servers { broker: &'a mut Broker, pg: &'a mut Option<PgServer> },
    Embedded { broker: &'a Interrupting },
}

#[derive(Debug, Default, Clone)]
pub(crate) struct FaultCounts {
    pub(crate) relay_kills: u64,
    pub(crate) nats_kills: u64,
    /// Broker kills that found a relay waiting on the broker.
    pub(crate) nats_kills_mid_batch: u64,
    /// Broker kills the moment a batch's acknowledgements came back.
    pub(crate) nats_kills_after_ack: u64,
    pub(crate) nats_down: Duration,
    pub(crate) members_lost: u64,
    /// Times the single server went back to an older copy of its store.
    pub(crate) older_copies: u64,
    /// Acknowledgements the relays got while the server ran on what it then lost.
    pub(crate) acked_then_lost: u64,
    pub(crate) cluster_restarts: u64,
    /// Acknowledgements counted when the member was lost (the stream must go on taking
    /// messages after).
    pub(crate) acked_at_loss: Option<u64>,
    pub(crate) pg_restarts: u64,
    pub(crate) pg_down: Duration,
    /// Outages of the in-process broker, and those that began mid-batch.
    pub(crate) broker_outages: u64,
    pub(crate) broker_outages_mid_batch: u64,
}

/// The standalone relays: `LogRelay::run` in tokio tasks, respawned when killed. They
/// compete for the partitions with the bus's own background relay, which is never killed.
pub(crate) struct Relays {
    store: EventStore,
    publisher: Arc<dyn Publisher>,
    slots: Vec<Option<JoinHandle<Result<(), EventError>>>>,
    stop: watch::Sender<bool>,
    /// Relay tasks that panicked (each one is respawned).
    pub(crate) panics: u64,
    /// Relay tasks that returned an error (`run` documents none in practice).
    pub(crate) errors: u64,
    pub(crate) last_panic: Option<String>,
    /// Relays that did not stop within 10 s of being asked (`run` finishes its batch, at
    /// most one acknowledgement timeout, then returns); each was aborted.
    pub(crate) stuck: u64,
}

impl Relays {
    pub(crate) fn start(store: EventStore, publisher: Arc<dyn Publisher>, count: usize) -> Self {
        let (stop, _) = watch::channel(false);
        let mut relays = Self {
            store,
            publisher,
            slots: Vec::new(),
            stop,
            panics: 0,
            errors: 0,
            last_panic: None,
            stuck: 0,
        };
        relays.slots = (0..count).map(|_| Some(relays.spawn())).collect();
        relays
    }

    fn spawn(&self) -> JoinHandle<Result<(), EventError>> {
        // Short backoffs: the servers come back within seconds, and the run is short.
        let config = RelayConfig::default()
            .with_republish_lost(true)
            .with_poll_interval(Duration::from_millis(200))
            .with_min_backoff(Duration::from_millis(50))
            .with_max_backoff(Duration::from_secs(1));
        let relay = LogRelay::new(self.store.clone(), self.publisher.clone(), config);
        let mut stopped = self.stop.subscribe();
        tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await
        })
    }

    /// Counts and replaces relays that ended on their own (a panic inside a pass).
    pub(crate) async fn reap(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].as_ref().is_some_and(JoinHandle::is_finished) {
                if let Some(handle) = self.slots[i].take() {
                    self.account(handle.await);
                }
                self.slots[i] = Some(self.spawn());
            }
        }
    }

    fn account(&mut self, ended: Result<Result<(), EventError>, tokio::task::JoinError>) {
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(_)) => self.errors += 1,
            Err(join) if join.is_panic() => {
                self.panics += 1;
                let payload = join.into_panic();
                self.last_panic = Some(
                    payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default(),
                );
            }
            Err(_) => {} // cancelled by us
        }
    }

    /// Aborts relay `slot` at whatever point it is; the next is started after `pause`.
    pub(crate) async fn kill(&mut self, slot: usize, pause: Duration) {
        if let Some(handle) = self.slots[slot].take() {
            handle.abort();
            self.account(handle.await);
        }
        tokio::time::sleep(pause).await;
        self.slots[slot] = Some(self.spawn());
    }

    /// Asks every relay to stop; aborts one that does not within 10 s.
    pub(crate) async fn stop(mut self) -> Self {
        let _ = self.stop.send(true);
        for i in 0..self.slots.len() {
            if let Some(mut handle) = self.slots[i].take() {
                match tokio::time::timeout(Duration::from_secs(10), &mut handle).await {
                    Ok(ended) => self.account(ended),
                    Err(_) => {
                        self.stuck += 1;
                        handle.abort();
                        let _ = handle.await;
                    }
                }
            }
        }
        self
    }
}

/// Injects one fault and waits until the servers it touched are back (a cluster's
/// members are started; its elections may still run). `publishers` tell whether a relay is
/// mid-batch and how many acknowledgements came back.
pub(crate) async fn inject(
    fault: Fault,
    target: Target<'_>,
    relays: &mut Relays,
    publishers: &[&Counting],
    counts: &mut FaultCounts,
) {
    let acked = || publishers.iter().map(|p| p.acked()).sum::<u64>();
    crate::log::note(&format!("{fault:?} ({} acknowledgements so far)", acked()));
    let (broker, pg) = match target {
        Target::Servers { broker, pg } => (broker, pg),
        Target::Embedded { broker } => {
            match fault {
                Fault::KillRelay { slot, pause } => {
                    relays.kill(slot, pause).await;
                    counts.relay_kills += 1;
                }
                Fault::BrokerOutage { pause, mid_batch } => outage(broker, pause, mid_batch, counts).await,
                other => panic!("{other:?} has no meaning on the embedded default"),
            }
            return;
        }
    };
    match fault {
        Fault::KillRelay { slot, pause } => {
            relays.kill(slot, pause).await;
            counts.relay_kills += 1;
        }
        Fault::KillNats { pause, after_ack } => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            if after_ack {
                // Right after an acknowledgement: what the broker acknowledged must survive.
                let batches = || publishers.iter().map(|p| p.acked_batches()).sum::<u64>();
                let seen = batches();
                while batches() == seen && tokio::time::Instant::now() < deadline {
                    tokio::task::yield_now().await;
                }
                counts.nats_kills_after_ack += u64::from(batches() != seen);
            } else {
                // Mid-batch: wait (up to 2 s) until some relay waits on the broker.
                while !publishers.iter().any(|p| p.mid_batch()) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                counts.nats_kills_mid_batch += u64::from(publishers.iter().any(|p| p.mid_batch()));
            }
            let down = tokio::time::Instant::now();
            broker.kill_leader(crate::STREAM, pause).await;
            counts.nats_kills += 1;
            counts.nats_down += down.elapsed();
        }
        Fault::LoseMember => {
            if broker.lose_member(crate::STREAM).await.is_some() {
                counts.members_lost += 1;
                counts.acked_at_loss = Some(acked());
            }
        }
        Fault::RestoreOlder { gap } => {
            let down = tokio::time::Instant::now();
            let before = acked();
            if broker.restore_older_copy(gap).await {
                counts.older_copies += 1;
                counts.acked_then_lost += acked().saturating_sub(before);
            }
            counts.nats_down += down.elapsed().saturating_sub(gap);
        }
        Fault::RestartCluster { pause } => {
            let down = tokio::time::Instant::now();
            broker.restart_all(pause).await;
            counts.cluster_restarts += 1;
            counts.nats_down += down.elapsed();
        }
        Fault::RestartPostgres => {
            let mut server = pg.take().expect("the PostgreSQL server");
            let down = tokio::time::Instant::now();
            let (server, restarted) = tokio::task::spawn_blocking(move || {
                let restarted = server.restart_fast();
                (server, restarted)
            })
            .await
            .expect("pg_ctl restart ran");
            *pg = Some(server);
            if let Err(e) = restarted {
                panic!(
                    "the harness could not restart PostgreSQL (an environment failure, not a finding): {e}"
                );
            }
            counts.pg_restarts += 1;
            counts.pg_down += down.elapsed();
        }
        Fault::BrokerOutage { .. } => panic!("{fault:?}: the in-process broker is not in this run"),
    }
}

/// The in-process broker unavailable for `pause`: from the middle of the next batch of two
/// messages or more (waited for 2 s at most, else from then on), or at once.
async fn outage(broker: &Interrupting, pause: Duration, mid_batch: bool, counts: &mut FaultCounts) {
    if mid_batch {
        let seen = broker.interrupted();
        broker.armed.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while broker.interrupted() == seen && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Disarmed here, unless a batch took it meanwhile.
        let unused = broker.armed.swap(false, Ordering::SeqCst);
        counts.broker_outages_mid_batch += u64::from(!unused && broker.interrupted() != seen);
    }
    // Down from here (an interrupted batch made it unavailable a moment earlier).
    let down = tokio::time::Instant::now();
    broker.broker().set_available(false);
    tokio::time::sleep(pause).await;
    broker.broker().set_available(true);
    counts.broker_outages += 1;
    counts.nats_down += down.elapsed();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_a_function_of_the_seed_and_has_every_kind() {
        let single = Topology::Single;
        let a = schedule(42, Duration::from_secs(40), 2, &[], single);
        assert_eq!(a, schedule(42, Duration::from_secs(40), 2, &[], single));
        assert_ne!(a, schedule(43, Duration::from_secs(40), 2, &[], single));
        let without = schedule(42, Duration::from_secs(40), 2, &["nats-kill".to_owned()], single);
        assert!(without.iter().all(|(_, f)| !matches!(f, Fault::KillNats { .. })));
        assert!(a.iter().any(|(_, f)| matches!(f, Fault::KillRelay { .. })));
        assert!(a.iter().any(|(_, f)| matches!(f, Fault::KillNats { .. })));
        assert!(a.iter().any(|(_, f)| matches!(f, Fault::RestartPostgres)));
        assert!(a.iter().all(|(at, _)| *at <= Duration::from_secs(38)));
        assert!(a.iter().all(|(_, f)| !matches!(f, Fault::LoseMember | Fault::RestartCluster { .. })));
        assert_eq!(a.iter().filter(|(_, f)| matches!(f, Fault::RestoreOlder { .. })).count(), 1);

        let e = schedule(42, Duration::from_secs(20), 2, &[], Topology::Embedded);
        assert!(e.iter().any(|(_, f)| matches!(f, Fault::KillRelay { .. })));
        assert!(e.iter().any(|(_, f)| matches!(f, Fault::BrokerOutage { mid_batch: true, .. })));
        assert!(e.iter().all(|(_, f)| matches!(f, Fault::KillRelay { .. } | Fault::BrokerOutage { .. })));

        let c = schedule(42, Duration::from_secs(30), 2, &[], Topology::Cluster);
        assert_eq!(c.iter().filter(|(_, f)| matches!(f, Fault::LoseMember)).count(), 1);
        for kind in [
            |f: &Fault| matches!(f, Fault::KillRelay { .. }),
            |f: &Fault| matches!(f, Fault::KillNats { .. }),
            |f: &Fault| matches!(f, Fault::RestartPostgres),
            |f: &Fault| matches!(f, Fault::RestartCluster { .. }),
        ] {
            assert!(c.iter().any(|(_, f)| kind(f)), "{c:?}");
        }
    }
}
