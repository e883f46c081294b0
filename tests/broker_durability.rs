//! The broker's durability (issue 16): what nats-server keeps after a SIGKILL right after it
//! acknowledged, alone and as a cluster's stream leader; and what the relay does when a
//! stream lost messages it had acknowledged (restored from an older copy, deleted): it finds
//! it, holds the partitions, reports them, and sends what was lost again (on request, or on
//! its own), in order, without duplicates. Against real PostgreSQL and nats-server.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::nats::{self, NatsCluster, NatsServer, STREAM, stream_messages};
use common::{counted, store};
use edupulse_events::{
    EventStore, ExpectedSequence, LogRelay, NatsConfig, NatsPublisher, RelayConfig, StreamSpec, Uuid,
};

/// Appends `per` events to each of `aggregates`, numbered from `from`.
async fn commit(store: &EventStore, aggregates: &[Uuid], from: u64, per: u64) {
    for id in aggregates {
        let events: Vec<_> = (from..from + per).map(counted).collect();
        store.append("course", *id, ExpectedSequence::Any, events).await.unwrap();
    }
}

/// Every message of the test stream: `(aggregate id, sequence)` in stream order, and the
/// count of each event id.
async fn stream_of(publisher: &NatsPublisher) -> (Vec<(String, i64)>, HashMap<String, usize>) {
    let mut order = Vec::new();
    let mut ids = HashMap::new();
    for m in stream_messages(publisher).await {
        order.push((m.wire.aggregate_id.to_string(), m.wire.sequence));
        *ids.entry(m.event_id).or_default() += 1;
    }
    (order, ids)
}

/// Asserts each aggregate's events are in the stream exactly once, as 1..=n in order.
fn assert_complete(order: &[(String, i64)], ids: &HashMap<String, usize>, aggregates: &[Uuid], n: i64) {
    assert!(ids.values().all(|c| *c == 1), "duplicates in the stream: {ids:?}");
    for id in aggregates {
        let seen: Vec<i64> = order.iter().filter(|(a, _)| *a == id.to_string()).map(|(_, s)| *s).collect();
        assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "aggregate {id}: its events in the stream");
    }
}

/// Runs relay passes until `expected` events are in the stream (the horizon may hold some
/// back for a moment: other tests share the database).
async fn publish_until(relay: &LogRelay, publisher: &NatsPublisher, expected: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        relay.run_once().await.unwrap();
        let held = stream_messages(publisher).await.len();
        if held >= expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{held} of {expected} events published after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn aggregates(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::now_v7()).collect()
}

fn relay(store: &EventStore, publisher: &NatsPublisher, config: RelayConfig) -> LogRelay {
    LogRelay::new(store.clone(), Arc::new(publisher.clone()), config)
}

#[tokio::test]
async fn a_server_killed_right_after_acknowledging_keeps_every_acknowledged_message() {
    let store = store().await;
    let mut server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let ids = aggregates(20);
    commit(&store, &ids, 0, 10).await;
    common::until_readable(&store, 200).await;
    let pass = relay(&store, &publisher, RelayConfig::default()).run_once().await.unwrap();
    assert_eq!(pass.published, 200);
    // The acknowledgements are back: SIGKILL at once, before any sync of the store.
    server.kill().await;
    server.restart().await;
    let publisher = nats::publisher(&server).await;
    let (order, seen) = stream_of(&publisher).await;
    assert_complete(&order, &seen, &ids, 10);
    // Nothing was lost, so nothing is reported.
    relay(&store, &publisher, RelayConfig::default()).run_once().await.unwrap();
    assert!(store.relay_lag().await.unwrap().lost.is_empty());
}

#[tokio::test]
async fn a_cluster_stream_leader_killed_right_after_acknowledging_loses_nothing() {
    let store = store().await;
    let mut cluster = NatsCluster::start().await;
    let config = NatsConfig::default().with_ack_timeout(Duration::from_secs(2));
    let publisher = NatsPublisher::connect(&cluster.url(), config).await.unwrap();
    let spec = StreamSpec::new(STREAM, ["courses.>"]).with_replicas(3);
    publisher.ensure_stream(&spec).await.unwrap();
    let ids = aggregates(20);
    commit(&store, &ids, 0, 10).await;
    common::until_readable(&store, 200).await;
    let relay = relay(&store, &publisher, RelayConfig::default());
    let pass = relay.run_once().await.unwrap();
    assert_eq!(pass.published, 200);
    let leader = cluster.leader_of(STREAM).await.expect("the stream has a leader");
    cluster.nodes[leader].kill().await;
    // The two others elect a leader that has every acknowledged message, and take more.
    commit(&store, &ids, 10, 5).await;
    common::until_readable(&store, 300).await;
    publish_until(&relay, &publisher, 300).await;
    cluster.nodes[leader].restart().await;
    let (order, seen) = stream_of(&publisher).await;
    assert_complete(&order, &seen, &ids, 15);
    assert!(store.relay_lag().await.unwrap().lost.is_empty());
}

/// Copies a stopped server's store directory.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

#[tokio::test]
async fn a_stream_restored_from_an_older_copy_is_found_held_and_repaired_on_request_even_past_its_marks() {
    let store = store().await;
    let mut server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let config = RelayConfig::default().with_stream_check_interval(Duration::from_millis(100));
    let ids = aggregates(8);
    // A: published, then the server's store is copied (a backup).
    commit(&store, &ids, 0, 5).await;
    common::until_readable(&store, 40).await;
    publish_until(&relay(&store, &publisher, config.clone()), &publisher, 40).await;
    server.kill().await;
    let backup = server.dir().with_extension("backup");
    copy_dir(server.dir(), &backup);
    server.restart().await;
    // B: published and acknowledged, then the older copy is restored: B is lost.
    let publisher = nats::publisher(&server).await;
    commit(&store, &ids, 5, 5).await;
    common::until_readable(&store, 80).await;
    publish_until(&relay(&store, &publisher, config.clone()), &publisher, 80).await;
    server.kill().await;
    std::fs::remove_dir_all(server.dir()).unwrap();
    std::fs::rename(&backup, server.dir()).unwrap();
    server.restart().await;
    let publisher = nats::publisher(&server).await;
    assert_eq!(stream_messages(&publisher).await.len(), 40, "the restored stream holds A only");
    // Another service publishes 60 events into the same stream first: its last sequence (100)
    // passes every mark of ours (at most 80), so only the message at each mark tells.
    let other = common::store().await;
    let others = aggregates(6);
    commit(&other, &others, 0, 10).await;
    common::until_readable(&other, 60).await;
    publish_until(&relay(&other, &publisher, RelayConfig::default()), &publisher, 100).await;

    // C: committed after the loss. The relay finds the stream behind, holds the partitions
    // (C would land before the lost B) and reports them.
    commit(&store, &ids, 10, 2).await;
    common::until_readable(&store, 96).await;
    let relay = relay(&store, &publisher, config);
    // Two looks a second apart find it behind.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let lag = loop {
        relay.run_once().await.unwrap();
        let lag = store.relay_lag().await.unwrap();
        if !lag.lost.is_empty() || tokio::time::Instant::now() > deadline {
            break lag;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let partitions: std::collections::HashSet<i32> =
        ids.iter().map(|id| (id.as_u128() % 64) as i32).collect();
    let reported: std::collections::HashSet<i32> = lag.lost.iter().map(|m| m.partition).collect();
    assert_eq!(reported, partitions, "every partition of the lost events is reported: {:?}", lag.lost);
    assert!(
        lag.lost.iter().all(|m| m.stream == STREAM && m.held_sequence == Some(100) && m.acknowledged > 40),
        "{:?}",
        lag.lost
    );
    assert_eq!(lag.pending, 16, "C waits (B is past the checkpoints: lost, not pending): {lag:?}");
    assert_eq!(stream_messages(&publisher).await.len(), 100, "nothing newer of ours went out");

    // Asked to, the relay sends B again, then C: every event once, each aggregate in order.
    assert_eq!(store.request_republish_lost().await.unwrap(), lag.lost.len() as u64);
    publish_until(&relay, &publisher, 156).await;
    let (order, seen) = stream_of(&publisher).await;
    assert_eq!(order.len(), 156);
    assert_complete(&order, &seen, &ids, 12);
    assert_complete(&order, &seen, &others, 10);
    let lag = store.relay_lag().await.unwrap();
    assert!(lag.lost.is_empty() && lag.pending == 0, "{lag:?}");
}

#[tokio::test]
async fn a_deleted_stream_is_refilled_by_a_relay_that_republishes_lost_messages_itself() {
    let store = store().await;
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let config = RelayConfig::default().with_republish_lost(true);
    let ids = aggregates(6);
    commit(&store, &ids, 0, 4).await;
    common::until_readable(&store, 24).await;
    let relay = relay(&store, &publisher, config);
    publish_until(&relay, &publisher, 24).await;
    // The stream is deleted and made again, empty.
    publisher.jetstream().delete_stream(STREAM).await.unwrap();
    let publisher = nats::publisher(&server).await;
    commit(&store, &ids, 4, 3).await;
    common::until_readable(&store, 42).await;
    publish_until(&relay, &publisher, 42).await;
    let (order, seen) = stream_of(&publisher).await;
    assert_eq!(order.len(), 42);
    assert_complete(&order, &seen, &ids, 7);
    assert!(store.relay_lag().await.unwrap().lost.is_empty());
}

/// A publisher whose broker "restarted": its connection epoch moves on demand, and it does
/// not answer stream requests while `answering` is off.
struct Restarted {
    inner: NatsPublisher,
    epoch: std::sync::atomic::AtomicU64,
    answering: std::sync::atomic::AtomicBool,
}

impl edupulse_events::Publisher for Restarted {
    fn publish<'a>(
        &'a self,
        messages: &'a [edupulse_events::wire::OutgoingMessage],
    ) -> edupulse_events::BoxFuture<
        'a,
        Vec<Result<edupulse_events::PublishReceipt, edupulse_events::EventError>>,
    > {
        self.inner.publish(messages)
    }

    fn stream_state<'a>(
        &'a self,
        stream: &'a str,
    ) -> edupulse_events::BoxFuture<
        'a,
        Result<Option<edupulse_events::StreamState>, edupulse_events::EventError>,
    > {
        Box::pin(async move {
            if self.answering.load(std::sync::atomic::Ordering::SeqCst) {
                self.inner.stream_state(stream).await
            } else {
                Err(edupulse_events::EventError::Config("the broker does not answer yet".into()))
            }
        })
    }

    fn held_events<'a>(
        &'a self,
        stream: &'a str,
        last: u64,
        since: Option<edupulse_events::chrono::DateTime<edupulse_events::chrono::Utc>>,
        wanted: edupulse_events::AggregateFilter<'a>,
    ) -> edupulse_events::BoxFuture<'a, Result<Vec<Uuid>, edupulse_events::EventError>> {
        self.inner.held_events(stream, last, since, wanted)
    }

    fn event_at<'a>(
        &'a self,
        stream: &'a str,
        sequence: u64,
    ) -> edupulse_events::BoxFuture<'a, Result<Option<Uuid>, edupulse_events::EventError>> {
        self.inner.event_at(stream, sequence)
    }

    fn connection_epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn after_a_reconnection_nothing_is_published_until_the_streams_are_checked() {
    use std::sync::atomic::Ordering::SeqCst;
    let store = store().await;
    let server = NatsServer::start().await;
    let nats = nats::publisher(&server).await;
    let gate = Arc::new(Restarted {
        inner: nats.clone(),
        epoch: std::sync::atomic::AtomicU64::new(1),
        answering: std::sync::atomic::AtomicBool::new(true),
    });
    let relay = LogRelay::new(store.clone(), gate.clone(), RelayConfig::default());
    let ids = aggregates(5);
    commit(&store, &ids, 0, 2).await;
    common::until_readable(&store, 10).await;
    publish_until(&relay, &nats, 10).await;

    // The connection was made again and the broker does not answer stream requests yet:
    // it may have restarted without what it acknowledged, so nothing goes out.
    gate.epoch.store(2, SeqCst);
    gate.answering.store(false, SeqCst);
    commit(&store, &ids, 2, 2).await;
    common::until_readable(&store, 20).await;
    let pass = relay.run_once().await.unwrap();
    assert_eq!(pass.published, 0, "published before the streams were checked: {pass:?}");
    assert_eq!(stream_messages(&nats).await.len(), 10);

    // Once it answers (and holds what it acknowledged), publication goes on.
    gate.answering.store(true, SeqCst);
    publish_until(&relay, &nats, 20).await;
    let (order, seen) = stream_of(&nats).await;
    assert_complete(&order, &seen, &ids, 4);
}

/// A broker whose answers are lost: the messages are stored, the relay hears nothing back
/// (its acknowledgement timed out).
struct AnswersLost {
    inner: NatsPublisher,
}

impl edupulse_events::Publisher for AnswersLost {
    fn publish<'a>(
        &'a self,
        messages: &'a [edupulse_events::wire::OutgoingMessage],
    ) -> edupulse_events::BoxFuture<
        'a,
        Vec<Result<edupulse_events::PublishReceipt, edupulse_events::EventError>>,
    > {
        Box::pin(async move {
            let stored = self.inner.publish(messages).await;
            stored
                .into_iter()
                .map(|outcome| {
                    outcome
                        .and(Err(edupulse_events::EventError::Config("the acknowledgement was lost".into())))
                })
                .collect()
        })
    }

    edupulse_events::forward_publisher!(inner);
}

#[tokio::test]
async fn an_event_sent_longer_ago_than_the_duplicate_window_is_not_sent_again_when_the_stream_holds_it() {
    let store = store().await;
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let window = Duration::from_secs(2);
    let spec = StreamSpec::new(STREAM, ["courses.>", "tenant-42.courses.>"]).with_duplicate_window(window);
    publisher.ensure_stream(&spec).await.unwrap();
    let ids = aggregates(4);
    commit(&store, &ids, 0, 3).await;
    common::until_readable(&store, 12).await;
    publish_until(&relay(&store, &publisher, RelayConfig::default()), &publisher, 12).await;
    // A relay sends 12 more; the broker stores them, but no acknowledgement comes back, and
    // the relay dies before it hears anything.
    commit(&store, &ids, 3, 3).await;
    common::until_readable(&store, 24).await;
    let unheard = LogRelay::new(
        store.clone(),
        Arc::new(AnswersLost { inner: publisher.clone() }),
        RelayConfig::default(),
    );
    unheard.run_once().await.unwrap();
    assert_eq!(stream_messages(&publisher).await.len(), 24);
    assert_eq!(store.relay_lag().await.unwrap().pending, 12, "nothing acknowledged, nothing checkpointed");
    // Longer than the window later, the next relay publishes from the checkpoint.
    tokio::time::sleep(window + Duration::from_secs(1)).await;
    let next = relay(&store, &publisher, RelayConfig::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store.relay_lag().await.unwrap().pending > 0 {
        next.run_once().await.unwrap();
        assert!(tokio::time::Instant::now() < deadline, "not published: {:?}", store.relay_lag().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (order, seen) = stream_of(&publisher).await;
    assert_eq!(order.len(), 24, "re-sent past the duplicate window, the stream would hold 36");
    assert_complete(&order, &seen, &ids, 6);
}

/// Refuses the events of one aggregate (as a broker that times out) while `failing` is set.
struct FailsOne {
    inner: NatsPublisher,
    aggregate: Uuid,
    failing: std::sync::atomic::AtomicBool,
}

impl edupulse_events::Publisher for FailsOne {
    fn publish<'a>(
        &'a self,
        messages: &'a [edupulse_events::wire::OutgoingMessage],
    ) -> edupulse_events::BoxFuture<
        'a,
        Vec<Result<edupulse_events::PublishReceipt, edupulse_events::EventError>>,
    > {
        Box::pin(async move {
            if !self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return self.inner.publish(messages).await;
            }
            // The others go out (each aggregate's in order); this aggregate's fail.
            let others: Vec<_> =
                messages.iter().filter(|m| m.aggregate_id != self.aggregate).cloned().collect();
            let mut sent = self.inner.publish(&others).await.into_iter();
            messages
                .iter()
                .map(|m| {
                    if m.aggregate_id == self.aggregate {
                        Err(edupulse_events::EventError::Config("no acknowledgement".into()))
                    } else {
                        sent.next().unwrap_or(Err(edupulse_events::EventError::Config("missing".into())))
                    }
                })
                .collect()
        })
    }

    edupulse_events::forward_publisher!(inner);
}

#[tokio::test]
async fn events_acknowledged_past_a_failed_one_are_sent_again_after_the_stream_lost_them() {
    let store = store().await;
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    // Two aggregates of one partition: the first one's event fails, the second's three
    // after it are acknowledged, so the partition's checkpoint stays before the failure.
    let first = Uuid::now_v7();
    let second = std::iter::repeat_with(Uuid::now_v7)
        .find(|id| id.as_u128() % 64 == first.as_u128() % 64)
        .unwrap_or_default();
    commit(&store, &[first], 0, 1).await;
    commit(&store, &[second], 0, 3).await;
    common::until_readable(&store, 4).await;
    let failing = Arc::new(FailsOne {
        inner: publisher.clone(),
        aggregate: first,
        failing: std::sync::atomic::AtomicBool::new(true),
    });
    let config = RelayConfig::default()
        .with_republish_lost(true)
        .with_stream_check_interval(Duration::from_millis(300))
        .with_min_backoff(Duration::from_millis(100))
        .with_max_backoff(Duration::from_millis(300));
    let relay = LogRelay::new(store.clone(), failing.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move { relay.run(async { drop(stopped.await) }).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream_messages(&publisher).await.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the second aggregate's events were not published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stream loses them (deleted, made again empty); the relay finds it and repairs.
    publisher.jetstream().delete_stream(STREAM).await.unwrap();
    let publisher = nats::publisher(&server).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store.relay_lag().await.unwrap().lost.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the loss was not found");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while !store.relay_lag().await.unwrap().lost.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the loss was not repaired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The failed event goes through now: every event must be in the stream, in order.
    failing.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream_messages(&publisher).await.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 4 events in the stream: acknowledged before the loss, never sent again",
            stream_messages(&publisher).await.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let (order, seen) = stream_of(&publisher).await;
    assert_eq!(order.len(), 4);
    assert_complete(&order, &seen, &[first], 1);
    assert_complete(&order, &seen, &[second], 3);
}

#[tokio::test]
async fn nothing_sent_while_the_broker_is_down_goes_out_unchecked_when_it_is_back() {
    let store = store().await;
    let mut server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    // A copy of the store with the stream still empty: what the server comes back with.
    server.kill().await;
    let older = server.dir().with_extension("older");
    let copied = std::process::Command::new("cp").arg("-a").arg(server.dir()).arg(&older).status();
    assert!(copied.is_ok_and(|s| s.success()));
    server.restart().await;
    let relay = relay(&store, &publisher, RelayConfig::default().with_min_backoff(Duration::from_millis(50)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move { relay.run(async { drop(stopped.await) }).await });
    let ids = aggregates(4);
    commit(&store, &ids, 0, 2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream_messages(&publisher).await.len() < 8 {
        assert!(tokio::time::Instant::now() < deadline, "the first events were not published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The server dies; the running relay, checked on this connection, tries the next events
    // while it is down.
    server.kill().await;
    commit(&store, &ids, 2, 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // It comes back without what it acknowledged. Nothing the client kept from the outage
    // may land in it before the relay has looked: the stream would hold each aggregate's
    // third event without its first two.
    std::fs::remove_dir_all(server.dir()).unwrap();
    std::fs::rename(&older, server.dir()).unwrap();
    server.restart().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = stream_messages(&publisher).await;
    assert!(held.is_empty(), "{} messages sent while the broker was down went out unchecked", held.len());
    assert!(!store.relay_lag().await.unwrap().lost.is_empty(), "the relay found the stream behind");
    // Repaired on request: every event once, in order.
    store.request_republish_lost().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stream_messages(&publisher).await.len() < 16 {
        assert!(tokio::time::Instant::now() < deadline, "not repaired: {:?}", store.relay_lag().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let (order, seen) = stream_of(&publisher).await;
    assert_complete(&order, &seen, &ids, 4);
}

#[tokio::test]
async fn a_server_back_from_an_older_copy_while_a_page_is_read_gets_nothing_before_its_streams_are_checked() {
    let store = store().await;
    let mut server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    // A copy of the server's store with the stream still empty: what it comes back with.
    server.kill().await;
    let older = server.dir().with_extension("older");
    copy_dir(server.dir(), &older);
    server.restart().await;
    let config = RelayConfig::default().with_republish_lost(true);
    let relay = Arc::new(relay(&store, &publisher, config));
    // A: published and acknowledged; the older copy does not hold it.
    let ids = aggregates(4);
    commit(&store, &ids, 0, 2).await;
    common::until_readable(&store, 8).await;
    publish_until(&relay, &publisher, 8).await;
    // B: committed. The relay's next pass checks the streams (they hold A), then reads its
    // page, which takes long (big events, a slow database; here the events table is locked).
    commit(&store, &ids, 2, 2).await;
    common::until_readable(&store, 16).await;
    let pool = common::pg_pool(&store);
    let mut lock = pool.begin().await.unwrap();
    let events = format!("\"{}\".events", store.config().schema.as_str());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("LOCK TABLE {events} IN ACCESS EXCLUSIVE MODE")))
        .execute(&mut *lock)
        .await
        .unwrap();
    let pass = tokio::spawn({
        let relay = relay.clone();
        async move { relay.run_once().await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = to_regclass($1)",
        )
        .bind(&events)
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the relay never read its page");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Meanwhile the server comes back from the older copy (without A), and the clients
    // connect to it again (the application's on its own; the publishing one is made again
    // by the next publish).
    let connects =
        || publisher.jetstream().client().statistics().connects.load(std::sync::atomic::Ordering::Relaxed);
    let before = connects();
    server.kill().await;
    std::fs::remove_dir_all(server.dir()).unwrap();
    std::fs::rename(&older, server.dir()).unwrap();
    server.restart().await;
    while connects() == before {
        assert!(tokio::time::Instant::now() < deadline + Duration::from_secs(10), "no reconnection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The page is read now. The streams were checked on the other connection: B would land
    // in the stream before A, which is sent again only once the loss is found.
    lock.rollback().await.unwrap();
    let pass = pass.await.unwrap().unwrap();
    let held = stream_messages(&publisher).await;
    assert!(
        held.is_empty(),
        "{} events went out on a connection whose streams were never checked ({pass:?}): each aggregate's \
         third event before its first",
        held.len()
    );
    // The relay finds the loss, sends A again, then B: every event once, in order.
    publish_until(&relay, &publisher, 16).await;
    let (order, seen) = stream_of(&publisher).await;
    assert_eq!(order.len(), 16);
    assert_complete(&order, &seen, &ids, 4);
    assert!(store.relay_lag().await.unwrap().lost.is_empty());
}

/// `n` messages of `size` bytes each, one per aggregate (all pipelined), on the test stream.
fn big_messages(n: usize, size: usize) -> Vec<edupulse_events::wire::OutgoingMessage> {
    use edupulse_events::wire::{OutgoingMessage, headers};
    (0..n)
        .map(|i| {
            let (event_id, aggregate) = (Uuid::now_v7(), Uuid::now_v7());
            let body = serde_json::json!({
                "event_id": event_id, "event_type": "Counted", "schema_version": 1, "aggregate_type": "course",
                "aggregate_id": aggregate, "sequence": 1, "occurred_at": "2026-12-03T00:00:00Z",
                "recorded_at": "2026-12-03T00:00:00Z", "global_position": i, "payload": {"pad": "x".repeat(size)},
                "metadata": {},
            });
            OutgoingMessage {
                event_id,
                aggregate_id: aggregate,
                global_position: i as i64,
                subject: "courses.counted".into(),
                headers: vec![(headers::MSG_ID, event_id.to_string()), (headers::AGGREGATE_ID, aggregate.to_string())],
                body: serde_json::to_vec(&body).unwrap().into(),
            }
        })
        .collect()
}

/// The messages the test stream holds, read on a connection of its own.
async fn held_by(server: &NatsServer) -> u64 {
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut stream = async_nats::jetstream::new(client).get_stream(STREAM).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// The NATS client keeps what it was handed while its connection was breaking and sends it
/// on the next connection, before the relay could check the stream: against a server that
/// came back without messages it had acknowledged (an older copy of its store), such a
/// message lands after the hole, before the lost ones are sent again (found by the fault
/// harness with fast batches: 376 order violations). The publisher's connection is never
/// made again: what it held when the connection broke is dropped, and reported as not
/// acknowledged; publishing goes on over a new connection once the streams are checked.
#[tokio::test]
async fn nothing_the_client_held_when_its_connection_broke_reaches_the_server_afterwards() {
    use edupulse_events::Publisher;
    let server = NatsServer::start().await;
    let proxy = common::proxy::Proxy::start(server.port()).await;
    let config = NatsConfig::default().with_ack_timeout(Duration::from_secs(3));
    let publisher = NatsPublisher::connect(&proxy.url(), config).await.unwrap();
    publisher.ensure_stream(&nats::spec()).await.unwrap();
    let first = publisher.publish(&big_messages(1, 10)).await;
    assert!(first.iter().all(Result::is_ok), "{first:?}");
    let epoch = publisher.connection_epoch();

    // The proxy stops carrying what the client sends: 40 MB back up in the client, most
    // of it in its own queue (the sockets hold a few MB).
    proxy.stall();
    let held = big_messages(40, 1_000_000);
    let publishing = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish(&held).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    let outcomes = tokio::time::timeout(Duration::from_secs(30), publishing).await.unwrap().unwrap();
    assert!(outcomes.iter().all(Result::is_err), "acknowledged across the break: {outcomes:?}");

    // Whatever connects again through the proxy, nothing of what was held reaches the
    // server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(held_by(&server).await, 1, "messages the client held at the break were stored afterwards");

    // Publishing goes on, on a new connection (a new epoch, so the relay checks its streams
    // first).
    let mut next = Vec::new();
    for _ in 0..20 {
        next = publisher.publish(&big_messages(2, 10)).await;
        if next.iter().all(Result::is_ok) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(next.iter().all(Result::is_ok), "{next:?}");
    assert_ne!(publisher.connection_epoch(), epoch);
    assert_eq!(held_by(&server).await, 3);
}
