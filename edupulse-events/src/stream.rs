//! Streams of stored events, read page by page as they are polled.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_core::Stream;
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use crate::store::{Backend, EventStore, StreamPosition};
use crate::{DomainEvent, EventEnvelope, EventError, Metadata};

/// One row of the events table, before decoding.
pub(crate) struct StoredRow {
    pub(crate) global_position: i64,
    pub(crate) transaction_id: i64,
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: Uuid,
    pub(crate) sequence: i64,
    pub(crate) event_type: String,
    pub(crate) schema_version: i32,
    pub(crate) payload: String,
    pub(crate) metadata: String,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) recorded_at: DateTime<Utc>,
}

/// Reads a stored row from a query result of either backend (the same column names).
pub(crate) fn stored_row<'r, R: Row>(row: &'r R) -> Result<StoredRow, sqlx::Error>
where
    &'static str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Uuid: Decode<'r, R::Database> + Type<R::Database>,
    DateTime<Utc>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(StoredRow {
        global_position: row.try_get("global_position")?,
        transaction_id: row.try_get("transaction_id")?,
        event_id: row.try_get("event_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        occurred_at: row.try_get("occurred_at")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

impl StoredRow {
    /// Decodes the row through `E`'s upcaster chain; errors name the global position.
    pub(crate) fn decode<E: DomainEvent>(self) -> Result<EventEnvelope<E>, EventError> {
        // A negative or zero version is reported as unsupported by the decoder.
        let version = u32::try_from(self.schema_version).unwrap_or(0);
        self.decode_as_version(version)
    }

    /// Decodes the row as a payload of `version` (the wire carries it as `u32`).
    pub(crate) fn decode_as_version<E: DomainEvent>(
        self,
        version: u32,
    ) -> Result<EventEnvelope<E>, EventError> {
        let position = self.global_position;
        let event = E::decode(&self.event_type, version, self.payload.as_bytes())
            .map_err(|e| e.at_position(position))?;
        let metadata: Metadata =
            serde_json::from_str(&self.metadata).map_err(|source| EventError::Decode {
                event_type: self.event_type.clone(),
                version,
                position: Some(position),
                source: format!("invalid metadata: {source}").into(),
            })?;
        Ok(EventEnvelope {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            global_position: Some(position),
            occurred_at: self.occurred_at,
            recorded_at: Some(self.recorded_at),
            metadata,
            event,
        })
    }
}

/// What a stream reads.
pub(crate) enum PageQuery {
    /// One aggregate, by sequence.
    Aggregate(Uuid),
    /// The global stream, optionally only some event types.
    All { event_types: Option<Vec<String>> },
    /// Events whose keys contain `filter` (a JSON object), by global position.
    Key { filter: serde_json::Value, event_types: Vec<String> },
}

impl PageQuery {
    /// The cursor after `row`.
    fn cursor_after(&self, row: &StoredRow) -> StreamPosition {
        match self {
            Self::Aggregate(_) => StreamPosition { transaction_id: 0, global_position: row.sequence },
            Self::All { .. } => {
                StreamPosition { transaction_id: row.transaction_id, global_position: row.global_position }
            }
            Self::Key { .. } => StreamPosition { transaction_id: 0, global_position: row.global_position },
        }
    }
}

/// One page, and for a stream of some event types the end of the whole stream as it was
/// just before the page was read.
type PageFuture =
    Pin<Box<dyn Future<Output = Result<(Vec<StoredRow>, Option<StreamPosition>), EventError>> + Send>>;

/// The last position of the global stream readable now, of any event type (`START` when
/// it is empty): on PostgreSQL the last row below the transaction horizon, on SQLite (one
/// writer, positions in commit order) the last committed row.
///
/// Every row up to it has committed, and no row can commit later at or below it, so a
/// reader of some event types that read everything of its types after this query has
/// passed the other types' rows up to it too.
async fn stream_head(store: &EventStore) -> Result<StreamPosition, EventError> {
    let head = match &store.inner.backend {
        Backend::Postgres(pg) => pg.stream_head().await?,
        Backend::Sqlite(sq) => sq.stream_head().await?,
    };
    Ok(head.unwrap_or(StreamPosition::START))
}

/// A stream of decoded, upcast events from the store, read one page at a time as it is
/// polled: a slow consumer slows the reads, memory holds at most one page.
///
/// Items are `Result`s: a row that cannot be decoded is an `Err` naming its global position,
/// and the stream goes on after it; a database error is an `Err` too, and the next poll
/// retries the same page. The caller decides whether to stop or skip.
pub struct EventStream<E> {
    store: EventStore,
    query: std::sync::Arc<PageQuery>,
    position: StreamPosition,
    next_fetch: StreamPosition,
    buffer: VecDeque<StoredRow>,
    /// Where the position moves once the buffer is empty: the end of the stream read before
    /// a page of some types that was not full.
    head: Option<StreamPosition>,
    fetch: Option<PageFuture>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    follow: Option<Duration>,
    page_size: i64,
    done: bool,
    _event: PhantomData<fn() -> E>,
}

impl<E> std::fmt::Debug for EventStream<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("position", &self.position)
            .field("buffered", &self.buffer.len())
            .field("follow", &self.follow)
            .finish_non_exhaustive()
    }
}

impl<E: DomainEvent> EventStream<E> {
    pub(crate) fn new(store: EventStore, query: PageQuery, from: StreamPosition) -> Self {
        let page_size = i64::from(store.config().page_size.max(1));
        Self {
            store,
            query: std::sync::Arc::new(query),
            position: from,
            next_fetch: from,
            buffer: VecDeque::new(),
            head: None,
            fetch: None,
            sleep: None,
            follow: None,
            page_size,
            done: false,
            _event: PhantomData,
        }
    }

    /// Keeps polling for new events every `interval` once caught up, instead of ending.
    #[must_use]
    pub fn follow(mut self, interval: Duration) -> Self {
        self.follow = Some(interval);
        self
    }

    /// Reads `rows` rows per page (default: the store's `page_size`).
    #[must_use]
    pub fn page_size(mut self, rows: u32) -> Self {
        self.page_size = i64::from(rows.max(1));
        self
    }

    /// Reads only the event types `E` accepts (the global stream only; the others always
    /// do). Events of other types are left out instead of being `UnknownEventType` errors:
    /// what a projection interested in one context wants.
    ///
    /// The rows of other types are filtered out by the database, and the
    /// [`position`](EventStream::position) still moves past them: once the stream has read
    /// everything of its types up to the end, the position is the end of the whole stream,
    /// so a checkpoint saved from it does not make the next reader scan them again. This
    /// costs one more small query per page (the stream's last position, read before the
    /// page).
    #[must_use]
    pub fn only_known_types(mut self) -> Self {
        if let PageQuery::All { .. } = &*self.query {
            let types = E::ACCEPTED_TYPES.iter().map(|t| (*t).to_owned()).collect();
            self.query = std::sync::Arc::new(PageQuery::All { event_types: Some(types) });
        }
        self
    }

    /// The position after the last item yielded (an event or an undecodable row), or, with
    /// [`only_known_types`](EventStream::only_known_types) once the stream has read
    /// everything up to the end, after the last row of any type: where to resume. For
    /// [`EventStore::stream_all`] this is the checkpoint to save; for
    /// [`EventStore::load`], `global_position` holds the last sequence read.
    pub fn position(&self) -> StreamPosition {
        self.position
    }

    fn start_fetch(&mut self) {
        let store = self.store.clone();
        let query = self.query.clone();
        let after = self.next_fetch;
        let limit = self.page_size;
        self.fetch = Some(Box::pin(async move {
            // The end first, then the page: everything up to the end is in the page or
            // before it when the page is not full.
            let head = match &*query {
                PageQuery::All { event_types: Some(_) } => Some(stream_head(&store).await?),
                _ => None,
            };
            let rows = match &store.inner.backend {
                Backend::Postgres(pg) => pg.fetch_page(&query, after, limit).await?,
                Backend::Sqlite(sq) => sq.fetch_page(&query, after, limit).await?,
            };
            Ok((rows, head))
        }));
    }
}

impl<E: DomainEvent> Stream for EventStream<E> {
    type Item = Result<EventEnvelope<E>, EventError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(row) = this.buffer.pop_front() {
                this.position = this.query.cursor_after(&row);
                return Poll::Ready(Some(row.decode()));
            }
            if let Some(head) = this.head.take() {
                // Every row of our types up to `head` has been yielded: pass the others.
                this.position = this.position.max(head);
                this.next_fetch = this.next_fetch.max(head);
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(sleep) = &mut this.sleep {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if this.fetch.is_none() {
                this.start_fetch();
            }
            let Some(fetch) = &mut this.fetch else { continue };
            let page = match fetch.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(page) => page,
            };
            this.fetch = None;
            match page {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok((rows, head)) => {
                    let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= this.page_size;
                    if let Some(last) = rows.last() {
                        this.next_fetch = this.query.cursor_after(last);
                    }
                    this.buffer.extend(rows);
                    if !full {
                        this.head = head;
                        match this.follow {
                            Some(interval) if this.buffer.is_empty() => {
                                this.sleep = Some(Box::pin(tokio::time::sleep(interval)));
                            }
                            Some(_) => {}
                            None => this.done = true,
                        }
                    }
                }
            }
        }
    }
}
