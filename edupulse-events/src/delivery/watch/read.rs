//! Reading what a stream holds of some partitions' events (headers only), for the lookup of
//! old events before they are sent (`aged.rs`) and for a repair (`repair.rs`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::broker::Publisher;
use crate::delivery::watch::sequence::StreamSequence;
use crate::store::Partition;

/// A reading of what a stream holds.
pub(crate) enum Reading {
    /// What it holds of the partitions asked about.
    Holds(Held),
    /// The broker has no such stream.
    NoStream,
    /// The broker did not answer, could not read it to its end, or the relay was asked to
    /// stop meanwhile.
    NoAnswer,
}

/// What a stream holds of some partitions.
pub(crate) struct Held {
    /// Its last sequence when it was read.
    pub(crate) last: StreamSequence,
    /// Its subject filters.
    pub(crate) subjects: Vec<String>,
    /// The event ids it holds.
    pub(crate) events: HashSet<Uuid>,
    /// The partitions it holds any event of.
    pub(crate) partitions: HashSet<Partition>,
}

/// What `stream` holds of `partitions`' events (stored since `since`, when given). A long
/// read gives way to `stop`: the next holder reads again.
pub(crate) async fn read_stream(
    publisher: &dyn Publisher,
    stream: &Arc<str>,
    partitions: &[Partition],
    since: Option<DateTime<Utc>>,
    stop: &AtomicBool,
) -> Reading {
    let postponed = |e: &crate::EventError| {
        tracing::warn!(stream = &**stream, error = %e, "relay: cannot read what the stream holds; later");
    };
    let (last, subjects) = match publisher.stream_state(stream).await {
        Ok(Some(state)) => (StreamSequence::new(state.last_sequence), state.subjects),
        Ok(None) => return Reading::NoStream,
        Err(e) => {
            postponed(&e);
            return Reading::NoAnswer;
        }
    };
    // Which of the partitions the stream holds anything of, noted as it is read.
    let holding = Mutex::new(HashSet::new());
    let wanted = |aggregate_id: Uuid| {
        let partition = Partition::of(aggregate_id);
        let wanted = partitions.contains(&partition);
        if wanted {
            holding.lock().unwrap_or_else(PoisonError::into_inner).insert(partition);
        }
        wanted
    };
    let read = publisher.held_events(stream, last.get(), since, &wanted);
    let stopped = async {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let events = tokio::select! {
        held = read => held,
        () = stopped => return Reading::NoAnswer,
    };
    match events {
        Ok(events) => {
            let partitions = holding.into_inner().unwrap_or_else(PoisonError::into_inner);
            Reading::Holds(Held { last, subjects, events: events.into_iter().collect(), partitions })
        }
        Err(e) => {
            postponed(&e);
            Reading::NoAnswer
        }
    }
}
