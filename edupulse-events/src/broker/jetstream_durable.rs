//! A subscriber's durable consumer on JetStream: created, or bound to and brought to the
//! subscriber's settings; and what the server's refusals mean.

use std::fmt;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, FromConsumer, PullConsumer, pull};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};

use crate::broker::subscriber_config::SubscriberConfig;
use crate::{BrokerErrorKind, EventError};

/// The durable consumer `config` names, on `jetstream` (see [`Subscriber::new`](crate::Subscriber::new)).
///
/// # Errors
/// As [`Subscriber::new`](crate::Subscriber::new).
pub(crate) async fn open(
    jetstream: &jetstream::Context,
    config: &SubscriberConfig,
) -> Result<PullConsumer, EventError> {
    let stream = jetstream.get_stream(&config.stream).await.map_err(|e| stream_error(&config.stream, e))?;
    let in_flight = i64::try_from(config.max_in_flight).unwrap_or(i64::MAX);
    let wanted = pull::Config {
        durable_name: Some(config.durable_name.clone()),
        filter_subject: config.filter_subject.clone().unwrap_or_default(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver,
        max_ack_pending: in_flight,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let name = &config.durable_name;
    let consumer = match stream.consumer_info(name).await {
        Ok(info) => match reconcile(name, info.config, &wanted)? {
            None => stream.get_consumer(name).await.map_err(|e| {
                EventError::broker(BrokerErrorKind::Other, format!("cannot bind to the consumer: {e}"), e)
            })?,
            Some(updated) => {
                tracing::info!(consumer = %name, "subscriber: updating the durable consumer's settings");
                stream.create_consumer(updated).await.map_err(|e| refused_update(name, e))?
            }
        },
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            stream.create_consumer(wanted).await.map_err(|e| broker("cannot create the consumer", e))?
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::InvalidName => {
            return Err(EventError::Config(format!("invalid durable consumer name `{name}`: {e}")));
        }
        Err(e) => return Err(broker("cannot read the consumer", e)),
    };
    Ok(consumer)
}

/// A failed JetStream request of the subscriber, its kind from the client's, the client's
/// error as the source.
fn broker<K>(what: &str, e: async_nats::error::Error<K>) -> EventError
where
    K: ErrorKindOf + Clone + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static,
{
    let kind = e.kind().broker_kind();
    EventError::broker(kind, format!("{what}: {e}"), e)
}

/// The stream `name` could not be opened: named, and the fix when it does not exist.
fn stream_error(name: &str, e: async_nats::error::Error<GetStreamErrorKind>) -> EventError {
    let missing = matches!(e.kind(), GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
    if missing {
        let message = format!(
            "no stream `{name}` on the NATS server: the publishing service creates it at start-up \
             (`NatsPublisher::ensure_stream(&StreamSpec::new(\"{name}\", [\"<context>.>\"]))`), or \
             `SubscriberConfig::stream` names another stream"
        );
        return EventError::broker(BrokerErrorKind::NoStream, message, e);
    }
    broker(&format!("cannot open the stream `{name}`"), e)
}

/// What kind of broker failure an async-nats error kind is.
trait ErrorKindOf {
    fn broker_kind(&self) -> BrokerErrorKind;
}

impl ErrorKindOf for GetStreamErrorKind {
    fn broker_kind(&self) -> BrokerErrorKind {
        match self {
            Self::JetStream(e) if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
                BrokerErrorKind::NoStream
            }
            Self::JetStream(_) => BrokerErrorKind::Api,
            Self::Request => BrokerErrorKind::Unavailable,
            _ => BrokerErrorKind::Other,
        }
    }
}

impl ErrorKindOf for ConsumerErrorKind {
    fn broker_kind(&self) -> BrokerErrorKind {
        match self {
            Self::TimedOut => BrokerErrorKind::TimedOut,
            Self::Request => BrokerErrorKind::Unavailable,
            Self::JetStream(_) => BrokerErrorKind::Api,
            _ => BrokerErrorKind::Other,
        }
    }
}

impl ErrorKindOf for ConsumerInfoErrorKind {
    fn broker_kind(&self) -> BrokerErrorKind {
        match self {
            Self::TimedOut => BrokerErrorKind::TimedOut,
            Self::StreamNotFound => BrokerErrorKind::NoStream,
            Self::Request | Self::NoResponders | Self::Offline => BrokerErrorKind::Unavailable,
            Self::JetStream(_) => BrokerErrorKind::Api,
            _ => BrokerErrorKind::Other,
        }
    }
}

/// Compares an existing durable consumer with the wanted settings: `None` when the settings
/// the subscriber owns are equal, else the existing configuration with those settings
/// replaced (everything else kept), to send as an update.
fn reconcile(
    name: &str,
    existing: consumer::Config,
    wanted: &pull::Config,
) -> Result<Option<pull::Config>, EventError> {
    if existing.deliver_subject.is_some() {
        return Err(EventError::Config(format!(
            "the durable consumer `{name}` is a push consumer; a subscriber needs a pull consumer: \
             delete it or choose another durable name"
        )));
    }
    // The server refuses to change these in place; say so before asking it.
    let fixed = [
        ("deliver policy", existing.deliver_policy != wanted.deliver_policy),
        ("acknowledgement policy", existing.ack_policy != wanted.ack_policy),
    ];
    if let Some((setting, _)) = fixed.iter().find(|(_, differs)| *differs) {
        return Err(EventError::Config(format!(
            "the durable consumer `{name}` exists with another {setting}, which the server cannot \
             change in place: delete the consumer (its progress is lost) or choose another durable name"
        )));
    }
    if existing.filter_subject == wanted.filter_subject
        && existing.ack_wait == wanted.ack_wait
        && existing.max_deliver == wanted.max_deliver
        && existing.max_ack_pending == wanted.max_ack_pending
    {
        return Ok(None);
    }
    let updated = consumer::Config {
        filter_subject: wanted.filter_subject.clone(),
        ack_wait: wanted.ack_wait,
        max_deliver: wanted.max_deliver,
        max_ack_pending: wanted.max_ack_pending,
        ..existing
    };
    pull::Config::try_from_consumer_config(updated)
        .map(Some)
        .map_err(|e| EventError::Config(format!("the durable consumer `{name}` cannot be updated: {e}")))
}

/// The server refused to update an existing consumer: a request it answers with an error
/// is a setting it cannot change (a configuration problem), anything else the broker's.
fn refused_update(name: &str, error: ConsumerError) -> EventError {
    match error.kind() {
        ConsumerErrorKind::JetStream(e) if e.code() == 400 => EventError::Config(format!(
            "the server refuses to update the durable consumer `{name}` ({e}): delete the consumer \
             (its progress is lost) or choose another durable name"
        )),
        _ => broker("cannot update the consumer", error),
    }
}
