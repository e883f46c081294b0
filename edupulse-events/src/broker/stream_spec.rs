//! The stream events are published to: its settings, which the NATS publisher brings a
//! JetStream stream to (`NatsPublisher::ensure_stream`) and the in-process broker ignores.

use std::time::Duration;

setters!(StreamSpec {
    with_duplicate_window => duplicate_window: Duration,
    with_max_age => max_age: Duration,
    with_replicas => replicas: usize,
    with_atomic_publish => atomic_publish: bool,
    with_fast_publish => fast_publish: bool,
});

/// The JetStream stream events are stored in: [`StreamSpec::new`], then the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamSpec {
    /// The stream's name: letters, digits, `-` and `_`.
    pub name: String,
    /// The subjects it captures, wildcards allowed (`courses.>`).
    pub subjects: Vec<String>,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop re-sends (default 2 minutes).
    /// The relay's re-sends are de-duplicated only inside this window: keep it longer
    /// than a broker outage you want re-sends to be invisible across.
    pub duplicate_window: Duration,
    /// Keep messages this long; zero keeps them until limits apply (default zero). On an
    /// existing stream, zero leaves the stream's own max age as it is (see
    /// [`NatsPublisher::ensure_stream`](crate::NatsPublisher::ensure_stream)).
    pub max_age: Duration,
    /// Copies of the stream kept on different servers of a JetStream cluster: 1, 3 or 5
    /// (at most 5; 0, the default, means JetStream's default of 1 for a new stream and the
    /// stream's own setting for an existing one). With 3, JetStream acknowledges a message
    /// once two of the three servers stored it, and the stream survives the loss of one
    /// server; see DURABILITY.md in the repository.
    pub replicas: usize,
    /// Atomic publishing (default on): on nats-server 2.12.1 and later, the stream is made
    /// to take atomic batches, and an aggregate's long run of pending events may go as one
    /// batch (stored all together or not at all, one acknowledgement) instead of one
    /// acknowledgement round trip per event (see [`NatsConfig::min_batch`](crate::NatsConfig::min_batch)). Older servers
    /// keep one event in flight per aggregate. Off leaves the stream's setting as it is and
    /// sends one at a time.
    pub atomic_publish: bool,
    /// Fast-ingest batches (default on): on nats-server 2.14 and later, the stream is made
    /// to take them (`allow_batched`), and a publish of the relay in which some aggregate
    /// has more than three events goes to it as one batch, every aggregate's events in
    /// order, acknowledged every few hundred messages instead of one round trip per event
    /// (each aggregate's last event follows with an acknowledgement of its own); the server
    /// stores a batch's messages in the order sent and stops it at the first it does not
    /// store, so no aggregate's event lands after one that is missing. This replaces atomic
    /// batches where the server has both. Off leaves the stream's setting as it is.
    pub fast_publish: bool,
}

impl StreamSpec {
    /// A file-backed stream with a two-minute duplicate window.
    pub fn new(name: impl Into<String>, subjects: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            replicas: 0,
            atomic_publish: true,
            fast_publish: true,
        }
    }
}
