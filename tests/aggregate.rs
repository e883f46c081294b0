//! The aggregate repository against a real PostgreSQL: concurrent commands, snapshots.

mod common;

#[path = "../examples/enrolment/domain.rs"]
mod domain;

use std::sync::Arc;

use common::{counted, store};
use domain::{Course, CourseCommand};
use edupulse_events::{Aggregate, BusConfig, EventBus, InMemoryBroker, Repository, StoredSnapshot, Uuid};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

fn repository<A: Aggregate>(store: &edupulse_events::EventStore) -> Repository<A> {
    let bus = EventBus::new(store.clone(), Arc::new(InMemoryBroker::new()), BusConfig::default()).unwrap();
    Repository::new(bus)
}

#[tokio::test]
async fn eight_concurrent_commands_each_applied_once_gapless() {
    let store = store().await;
    let mut courses = repository::<Course>(&store);
    courses.max_attempts = 50;
    let courses = Arc::new(courses);
    let c = Uuid::now_v7();
    courses.execute(c, &CourseCommand::Open { course_id: c, capacity: 100 }).await.unwrap();
    let students: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = students
        .iter()
        .map(|&s| {
            let (courses, barrier) = (courses.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                courses.execute(c, &CourseCommand::Enroll { course_id: c, student_id: s }).await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().len(), 1);
    }
    let history: Vec<_> = store.load::<domain::EnrolmentEvent>(c, 1).map(|r| r.unwrap()).collect().await;
    assert_eq!(history.iter().map(|e| e.sequence).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    let loaded = courses.load(c).await.unwrap();
    assert_eq!(loaded.state.students, students.into_iter().collect());
}

/// A tally of `Counted` events, for long histories.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Tally {
    events: u64,
    sum: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Event = common::CourseEvent;
    type Command = u64;
    type Error = Never;

    fn apply(&mut self, event: &common::CourseEvent) {
        if let common::CourseEvent::Counted(c) = event {
            self.events += 1;
            self.sum += c.n;
        }
    }

    fn decide(&self, n: &u64) -> Result<Vec<common::CourseEvent>, Never> {
        Ok(vec![counted(*n)])
    }
}

#[tokio::test]
async fn snapshots_every_n_events_and_round_trip() {
    let store = store().await;
    let mut tallies = repository::<Tally>(&store);
    tallies.snapshot_every = 10;
    let id = Uuid::now_v7();
    for n in 1..=25 {
        tallies.execute(id, &n).await.unwrap();
    }
    let snapshot = store.snapshot(id).await.unwrap().expect("a snapshot was taken");
    assert_eq!((snapshot.sequence, snapshot.state_version), (20, 1));
    let loaded = tallies.load(id).await.unwrap();
    assert_eq!(loaded.events_read, 5, "only the tail after the snapshot is read");
    assert_eq!(loaded.state, Tally { events: 25, sum: (1..=25).sum() });
    assert_eq!(loaded.sequence, 25);
}

#[tokio::test]
async fn a_snapshot_of_an_old_state_version_is_ignored() {
    let store = store().await;
    let tallies = repository::<Tally>(&store);
    let id = Uuid::now_v7();
    store.append("tally", id, 0, (1..=30u64).map(counted)).await.unwrap();
    // A snapshot written by an older build whose state had another shape and meaning.
    let stale = StoredSnapshot {
        aggregate_id: id,
        aggregate_type: "tally".into(),
        sequence: 30,
        state_version: 0,
        state: r#"{"events": 999, "sum": 999}"#.into(),
    };
    store.save_snapshot(&stale).await.unwrap();
    let loaded = tallies.load(id).await.unwrap();
    assert_eq!(
        loaded.state,
        Tally { events: 30, sum: (1..=30).sum() },
        "rebuilt from events, never the stale state"
    );
    assert_eq!(loaded.events_read, 30);
    // Taking a new snapshot replaces the stale one, and then only the tail is read.
    tallies.snapshot_now(id).await.unwrap();
    assert_eq!(store.snapshot(id).await.unwrap().unwrap().state_version, 1);
    assert_eq!(tallies.load(id).await.unwrap().events_read, 0);
}

#[tokio::test]
async fn a_ten_thousand_event_aggregate_with_a_snapshot_reads_only_the_tail() {
    let store = store().await;
    let tallies = repository::<Tally>(&store);
    let id = Uuid::now_v7();
    let mut sequence = 0i64;
    while sequence < 10_000 {
        store.append("tally", id, sequence, (0..1000u64).map(|_| counted(1))).await.unwrap();
        sequence += 1000;
    }
    let full = tallies.load(id).await.unwrap();
    assert_eq!((full.events_read, full.state.events), (10_000, 10_000));
    tallies.snapshot_now(id).await.unwrap();
    for n in 0..3 {
        tallies.execute(id, &n).await.unwrap();
    }
    let loaded = tallies.load(id).await.unwrap();
    assert_eq!(loaded.events_read, 3);
    assert_eq!((loaded.sequence, loaded.state.events, loaded.state.sum), (10_003, 10_003, 10_003));
}
