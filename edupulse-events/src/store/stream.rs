//! Streams of stored events, read page by page as they are polled.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;

use crate::event::wire::WireEnvelope;
use crate::store::StreamPosition;
use crate::store::backend::Backend;
use crate::store::row::{PageQuery, StoredRow};
use crate::{DomainEvent, EventEnvelope, EventError};

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
async fn stream_head(backend: &Backend) -> Result<StreamPosition, EventError> {
    Ok(backend.stream_head().await?.unwrap_or(StreamPosition::START))
}

/// The paging engine under [`EventStream`] and [`RecordStream`]: one page at a time as it
/// is polled, each row made a `T`.
pub(crate) struct Pages<T> {
    backend: Backend,
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
    _item: PhantomData<fn() -> T>,
}

impl<T: FromRow> Pages<T> {
    fn new(backend: Backend, page_size: u32, query: PageQuery, from: StreamPosition) -> Self {
        let page_size = i64::from(page_size);
        Self {
            backend,
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
            _item: PhantomData,
        }
    }

    /// Restricts the global stream to these event types (the other queries ignore it).
    fn of_types(&mut self, types: Vec<String>) {
        if let PageQuery::All { .. } = &*self.query {
            self.query = std::sync::Arc::new(PageQuery::All { event_types: Some(types) });
        }
    }

    fn start_fetch(&mut self) {
        let backend = self.backend.clone();
        let query = self.query.clone();
        let after = self.next_fetch;
        let limit = self.page_size;
        self.fetch = Some(Box::pin(async move {
            // The end first, then the page: everything up to the end is in the page or
            // before it when the page is not full.
            let head = match &*query {
                PageQuery::All { event_types: Some(_) } => Some(stream_head(&backend).await?),
                _ => None,
            };
            let rows = backend.fetch_page(&query, after, limit).await?;
            Ok((rows, head))
        }));
    }
}

impl<T: FromRow> Stream for Pages<T> {
    type Item = Result<T, EventError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.page_size < 1 && !this.done {
            this.done = true;
            return Poll::Ready(Some(Err(EventError::Config(
                "a stream's page size must be at least 1".into(),
            ))));
        }
        loop {
            if let Some(row) = this.buffer.pop_front() {
                this.position = this.query.cursor_after(&row);
                return Poll::Ready(Some(T::from_row(row)));
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

/// What a stream makes of a stored row.
pub(crate) trait FromRow: Sized {
    fn from_row(row: StoredRow) -> Result<Self, EventError>;
}

impl<E: DomainEvent> FromRow for EventEnvelope<E> {
    fn from_row(row: StoredRow) -> Result<Self, EventError> {
        row.decode()
    }
}

impl FromRow for StoredRecord {
    fn from_row(mut row: StoredRow) -> Result<Self, EventError> {
        let position =
            StreamPosition { transaction_id: row.transaction_id, global_position: row.global_position };
        let subject = row.subject.take();
        Ok(Self { position, subject, envelope: row.into_wire()? })
    }
}

/// Generates the settings and the `Stream` impl a public stream shares with the engine.
macro_rules! paged {
    ($name:ident $(<$param:ident: $bound:path>)?, $item:ty) => {
        impl$(<$param: $bound>)? $name$(<$param>)? {
            /// Keeps polling for new events every `interval` once caught up, instead of ending.
            #[must_use]
            pub fn follow(mut self, interval: Duration) -> Self {
                self.pages.follow = Some(interval);
                self
            }

            /// Reads `rows` rows per page (default: the store's `page_size`). Zero is invalid:
            /// the stream's first item is then an [`EventError::Config`], and it ends.
            #[must_use]
            pub fn page_size(mut self, rows: u32) -> Self {
                self.pages.page_size = i64::from(rows);
                self
            }

            /// The position after the last item yielded (an event or an undecodable row),
            /// or, when the stream reads only some event types and has read everything up to
            /// the end, after the last row of any type: where to resume. For the global
            /// stream this is the checkpoint to save; for one aggregate's stream,
            /// `global_position` holds the last sequence read.
            pub fn position(&self) -> StreamPosition {
                self.pages.position
            }
        }

        impl$(<$param: $bound>)? Stream for $name$(<$param>)? {
            type Item = Result<$item, EventError>;

            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                Pin::new(&mut self.pages).poll_next(cx)
            }
        }

        impl$(<$param>)? std::fmt::Debug for $name$(<$param>)? {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("position", &self.pages.position)
                    .field("buffered", &self.pages.buffer.len())
                    .field("follow", &self.pages.follow)
                    .finish_non_exhaustive()
            }
        }
    };
}

/// A stream of decoded, upcast events from the store, read one page at a time as it is
/// polled: a slow consumer slows the reads, memory holds at most one page.
///
/// Items are `Result`s: a row that cannot be decoded is an `Err` naming its global position,
/// and the stream goes on after it; a database error is an `Err` too, and the next poll
/// retries the same page. The caller decides whether to stop or skip.
pub struct EventStream<E> {
    pages: Pages<EventEnvelope<E>>,
}

paged!(EventStream<E: DomainEvent>, EventEnvelope<E>);

impl<E: DomainEvent> EventStream<E> {
    pub(crate) fn new(backend: Backend, page_size: u32, query: PageQuery, from: StreamPosition) -> Self {
        Self { pages: Pages::new(backend, page_size, query, from) }
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
        self.pages.of_types(E::ACCEPTED_TYPES.iter().map(|t| (*t).to_owned()).collect());
        self
    }
}

/// An event as it was recorded, not decoded.
#[derive(Debug)]
#[non_exhaustive]
pub struct StoredRecord {
    /// Its position in the global stream (the transaction id as the stream orders it).
    pub position: StreamPosition,
    /// The subject it is published on (`None`: an event stored without one, which the relay
    /// does not publish).
    pub subject: Option<String>,
    /// The event as a message body carries it: payload and metadata as stored.
    pub envelope: WireEnvelope,
}

/// The stored events as they were recorded, not decoded: each a [`StoredRecord`], its
/// envelope the same JSON a message carries. For tools that do not know the event types
/// (the `edupulse` command line's `tail`, `republish`), read like an [`EventStream`].
///
/// A row whose stored payload or metadata is not valid JSON is an `Err` naming its global
/// position, and the stream goes on after it.
pub struct RecordStream {
    pages: Pages<StoredRecord>,
}

paged!(RecordStream, StoredRecord);

impl RecordStream {
    pub(crate) fn new(backend: Backend, page_size: u32, query: PageQuery, from: StreamPosition) -> Self {
        Self { pages: Pages::new(backend, page_size, query, from) }
    }

    /// Reads only events of these types (the global stream only), passing the others as
    /// [`EventStream::only_known_types`] does.
    #[must_use]
    pub fn of_types(mut self, types: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.pages.of_types(types.into_iter().map(Into::into).collect());
        self
    }
}
