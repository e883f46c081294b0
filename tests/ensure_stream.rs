//! `NatsPublisher::ensure_stream` on a stream an operator configured: only the subjects, the
//! duplicate window and a max age the spec sets change. Starts its own nats-server.

mod common;

use std::time::Duration;

use common::nats::NatsServer;
use edupulse_events::async_nats;
use edupulse_events::async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use edupulse_events::wire::{self, OutgoingMessage};
use edupulse_events::{BrokerErrorKind, EventError, NatsConfig, NatsPublisher, Publisher, StreamSpec, Uuid};

#[tokio::test]
async fn ensure_stream_keeps_what_it_was_not_asked_to_change() {
    let server = NatsServer::start().await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let operator = Config {
        name: "KEPT".into(),
        subjects: vec!["old.>".into()],
        description: Some("set by the operator".into()),
        max_messages: 1000,
        max_bytes: 1 << 20,
        max_message_size: 4096,
        max_age: Duration::from_secs(3600),
        discard: DiscardPolicy::New,
        retention: RetentionPolicy::Limits,
        storage: StorageType::Memory,
        duplicate_window: Duration::from_secs(60),
        ..Default::default()
    };
    js.create_stream(operator.clone()).await.unwrap();

    let publisher = NatsPublisher::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let mut spec = StreamSpec::new("KEPT", ["new.>", "other.>"]);
    spec.duplicate_window = Duration::from_secs(30);
    publisher.ensure_stream(&spec).await.unwrap();

    let info = js.get_stream("KEPT").await.unwrap().cached_info().config.clone();
    assert_eq!(info.subjects, ["new.>", "other.>"]);
    assert_eq!(info.duplicate_window, Duration::from_secs(30));
    assert_eq!(info.description.as_deref(), Some("set by the operator"));
    assert_eq!(info.max_messages, 1000);
    assert_eq!(info.max_bytes, 1 << 20);
    assert_eq!(info.max_message_size, 4096);
    assert_eq!(info.max_age, Duration::from_secs(3600), "a zero max_age in the spec leaves the stream's");
    assert_eq!(info.discard, DiscardPolicy::New);
    assert_eq!(info.storage, StorageType::Memory);
    assert_eq!(info.num_replicas, operator.num_replicas.max(1));

    // A max age the spec sets is applied; the rest still stays.
    spec.max_age = Duration::from_secs(7200);
    publisher.ensure_stream(&spec).await.unwrap();
    let info = js.get_stream("KEPT").await.unwrap().cached_info().config.clone();
    assert_eq!(info.max_age, Duration::from_secs(7200));
    assert_eq!(info.max_messages, 1000);
    assert_eq!(info.description.as_deref(), Some("set by the operator"));

    // A missing stream is created file-backed, with the spec's settings.
    publisher.ensure_stream(&StreamSpec::new("FRESH", ["fresh.>"])).await.unwrap();
    let info = js.get_stream("FRESH").await.unwrap().cached_info().config.clone();
    assert_eq!(info.subjects, ["fresh.>"]);
    assert_eq!(info.storage, StorageType::File);
    assert_eq!(info.duplicate_window, Duration::from_secs(120));
}

/// A message with the given subject and body, as the relay hands them to a publisher.
fn message(subject: &str, body: Vec<u8>) -> OutgoingMessage {
    let id = Uuid::now_v7();
    OutgoingMessage {
        event_id: id,
        aggregate_id: Uuid::now_v7(),
        global_position: 1,
        subject: subject.into(),
        headers: vec![(wire::headers::MSG_ID, id.to_string())],
        body: body.into(),
    }
}

/// Publish failures keep what async-nats said: a subject no stream captures is a broker
/// error of kind `NoStream`, a message the stream refuses is a refusal, a server that is
/// gone times out; each carries the client's error as its source.
#[tokio::test]
async fn publish_errors_keep_their_kind_and_source() {
    let mut server = NatsServer::start().await;
    let config = NatsConfig::default().with_ack_timeout(Duration::from_millis(500));
    let publisher = NatsPublisher::connect(&server.url(), config).await.unwrap();
    let mut spec = StreamSpec::new("KINDS", ["kinds.>"]);
    spec.duplicate_window = Duration::from_secs(10);
    publisher.ensure_stream(&spec).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("KINDS").await.unwrap();
    let mut limited = stream.info().await.unwrap().config.clone();
    limited.max_message_size = 512;
    js.update_stream(&limited).await.unwrap();

    let batch = [message("nowhere.x", b"{}".to_vec()), message("kinds.big", vec![b' '; 2048])];
    let outcomes = publisher.publish(&batch).await;
    match &outcomes[0] {
        Err(e @ EventError::Broker { kind: BrokerErrorKind::NoStream, source: Some(_), .. }) => {
            assert_eq!(e.broker_kind(), Some(BrokerErrorKind::NoStream));
        }
        other => panic!("a subject without a stream: {other:?}"),
    }
    match &outcomes[1] {
        Err(e @ EventError::Refused { source: Some(_), .. }) => assert!(e.is_refusal()),
        other => panic!("a message over the stream's limit: {other:?}"),
    }

    server.kill().await;
    let outcome = publisher.publish(&[message("kinds.late", b"{}".to_vec())]).await;
    match &outcome[0] {
        Err(EventError::Broker {
            kind: BrokerErrorKind::TimedOut | BrokerErrorKind::Unavailable,
            source,
            ..
        }) => {
            assert!(source.is_some(), "the client's error is kept");
        }
        other => panic!("a server that is gone: {other:?}"),
    }
}
