//! `stream_all` never skips an event that commits late with a lower position, and never
//! delivers one twice or one that was rolled back. Against a real PostgreSQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{CourseEvent, counted, store};
use edupulse_events::{EventEnvelope, StreamPosition, Uuid};
use futures_util::StreamExt;

type Seen = Arc<Mutex<Vec<(StreamPosition, EventEnvelope<CourseEvent>)>>>;

/// A reader that follows the global stream from the start, polling every 5 ms, and records
/// each event with the stream position after it.
fn follow(store: &edupulse_events::EventStore) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let mut stream = store.stream_all::<CourseEvent>(StreamPosition::START).follow(Duration::from_millis(5));
    let handle = tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let envelope = item.expect("every event decodes");
            sink.lock().unwrap().push((stream.position(), envelope));
        }
    });
    (seen, handle)
}

async fn wait_for(seen: &Seen, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} events arrived",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn late_commit_with_lower_position_is_not_skipped() {
    let store = store().await;
    let (seen, reader) = follow(&store);
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());

    let mut tx_a = store.begin().await.unwrap();
    let low = tx_a.append("lesson", a, 0, [counted(1)]).await.unwrap()[0].global_position.unwrap();
    let mut tx_b = store.begin().await.unwrap();
    let high = tx_b.append("lesson", b, 0, [counted(2)]).await.unwrap()[0].global_position.unwrap();
    assert!(low < high);
    tx_b.commit().await.unwrap();

    // B is committed, but A (lower position) is still open: a `position > last` reader
    // would deliver B now and skip A for ever. The store holds B back until A ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(seen.lock().unwrap().is_empty(), "nothing may be delivered while an older transaction is open");

    tx_a.commit().await.unwrap();
    wait_for(&seen, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    reader.abort();
    let positions: Vec<i64> = seen.lock().unwrap().iter().map(|(_, e)| e.global_position.unwrap()).collect();
    assert_eq!(positions, [low, high], "every event, in position order, none twice");
}

#[tokio::test]
async fn concurrent_writers_with_rollbacks_none_skipped_none_twice() {
    const WRITERS: u64 = 8;
    const TRANSACTIONS: u64 = 25;
    let store = store().await;
    let (seen, reader) = follow(&store);

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut committed = Vec::new();
                let mut rolled_back = Vec::new();
                let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ (w + 1);
                let aggregates: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
                let mut sequences = [0i64; 3];
                for t in 0..TRANSACTIONS {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let which = (state % 3) as usize;
                    let batch = 1 + (state >> 8) % 3;
                    let mut tx = store.begin().await.unwrap();
                    let events: Vec<_> = (0..batch).map(|i| counted(w * 1_000_000 + t * 10 + i)).collect();
                    let stored =
                        tx.append("lesson", aggregates[which], sequences[which], events).await.unwrap();
                    // Stay open for a while, so that transactions overlap and commit out of
                    // position order.
                    tokio::time::sleep(Duration::from_millis((state >> 16) % 15)).await;
                    let ids = stored.iter().map(|e| e.event_id);
                    if t % 6 == 5 {
                        tx.rollback().await.unwrap();
                        rolled_back.extend(ids);
                    } else {
                        tx.commit().await.unwrap();
                        sequences[which] += batch as i64;
                        committed.extend(ids);
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();
    let mut committed = BTreeSet::new();
    let mut rolled_back = BTreeSet::new();
    for writer in writers {
        let (c, r) = writer.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    wait_for(&seen, committed.len()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    reader.abort();

    let seen = seen.lock().unwrap();
    let ids: Vec<Uuid> = seen.iter().map(|(_, e)| e.event_id).collect();
    let unique: BTreeSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "no event delivered twice");
    assert_eq!(unique, committed, "exactly the committed events");
    assert!(unique.is_disjoint(&rolled_back));
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "the stream position only moves forward");
    let mut last_sequence: BTreeMap<Uuid, i64> = BTreeMap::new();
    for (_, e) in seen.iter() {
        let last = last_sequence.entry(e.aggregate_id).or_insert(0);
        assert_eq!(e.sequence, *last + 1, "each aggregate's events arrive in sequence, gapless");
        *last = e.sequence;
    }
}
