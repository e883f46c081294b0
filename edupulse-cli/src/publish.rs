//! `edupulse publish` (the standalone publisher, with a progress line) and
//! `edupulse republish --from POSITION [--to POSITION]`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::ArgMatches;
use edupulse_events::wire::OutgoingMessage;
use edupulse_events::{
    BoxFuture, EventError, LogRelay, NatsPublisher, PublishReceipt, Publisher, RelayConfig, StreamSpec,
};

use crate::connect;
use crate::failure::Failure;
use crate::status::seconds;

/// The broker, counting what it acknowledged and keeping the last failure: the progress
/// line's figures.
struct Counting {
    inner: NatsPublisher,
    published: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Publisher for Counting {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            let outcomes = self.inner.publish(messages).await;
            for outcome in &outcomes {
                let counter = match outcome {
                    Ok(receipt) if receipt.duplicate => &self.duplicates,
                    Ok(_) => &self.published,
                    Err(e) => {
                        if let Ok(mut last) = self.last_error.lock() {
                            *last = Some(e.to_string());
                        }
                        &self.failed
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            outcomes
        })
    }

    edupulse_events::forward_publisher!(inner);
}

pub(crate) async fn run(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store(matches).await?;
    let nats = connect::nats(matches).await?;
    if let Some(stream) = matches.get_one::<String>("stream") {
        let subjects: Vec<String> =
            matches.get_many::<String>("subject").map(|s| s.cloned().collect()).unwrap_or_default();
        nats.ensure_stream(&StreamSpec::new(stream.clone(), subjects)).await?;
    }
    let counting = Arc::new(Counting {
        inner: nats,
        published: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        last_error: Mutex::new(None),
    });
    let relay = LogRelay::new(store, counting.clone(), RelayConfig::default());
    let limit = matches.get_one::<u64>("seconds").map(|s| Duration::from_secs(*s));
    let stop = async {
        match limit {
            Some(limit) => tokio::select! {
                () = tokio::time::sleep(limit) => {}
                _ = tokio::signal::ctrl_c() => {}
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let started = Instant::now();
    tokio::select! {
        result = relay.run(stop) => result?,
        () = progress(&relay, &counting, started) => {}
    }
    eprintln!(
        "edupulse: stopped after {}: {} published, {} duplicates, {} failed attempts",
        seconds(started.elapsed()),
        counting.published.load(Ordering::Relaxed),
        counting.duplicates.load(Ordering::Relaxed),
        counting.failed.load(Ordering::Relaxed),
    );
    Ok(ExitCode::SUCCESS)
}

/// A progress line on stderr once a second, for ever.
async fn progress(relay: &LogRelay, counting: &Counting, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut before = 0;
    loop {
        tick.tick().await;
        let published = counting.published.load(Ordering::Relaxed);
        let lag = match relay.lag().await {
            Ok(lag) => format!("{} pending, {} parked, {} held back", lag.pending, lag.parked, lag.held_back),
            Err(e) => format!("lag unknown ({e})"),
        };
        let last =
            counting.last_error.lock().ok().and_then(|e| e.clone()).map(|e| format!("; last error: {e}"));
        eprintln!(
            "[{:>7}] {published} published ({} ev/s), {} failed attempts; {lag}{}",
            seconds(started.elapsed()),
            published - before,
            counting.failed.load(Ordering::Relaxed),
            last.unwrap_or_default()
        );
        before = published;
    }
}

pub(crate) async fn republish(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    if matches.get_flag("lost") {
        return republish_lost(matches).await;
    }
    let from = matches.get_one::<i64>("from").copied().unwrap_or(1);
    let to = matches.get_one::<i64>("to").copied();
    if let Some(to) = to
        && to < from
    {
        return Err(Failure::Usage(format!(
            "--to {to} is before --from {from}: the range names no event (both ends are included)"
        )));
    }
    let store = connect::store(matches).await?;
    let nats = connect::nats(matches).await?;
    let relay = LogRelay::new(store, Arc::new(nats), RelayConfig::default());
    let done = relay.republish(from, to).await?;
    let sent = done.stored + done.duplicates;
    println!(
        "republished {sent} events from global position {from} to {}: {} stored, {} dropped by the server as \
         duplicates (the stream still held them inside its duplicate window){}",
        done.last_position,
        done.stored,
        done.duplicates,
        if done.unpublished > 0 {
            format!(", {} stored without a subject and not sent", done.unpublished)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `republish --lost`: asks the relays holding partitions whose stream lost messages to send
/// them again, and waits until none is reported.
async fn republish_lost(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store(matches).await?;
    let wait = Duration::from_secs(matches.get_one::<u64>("wait").copied().unwrap_or(120));
    let asked = store.request_republish_lost().await?;
    if asked == 0 {
        println!("no stream lost messages: nothing to send again");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "asked the relays to send again what {asked} partition stream(s) lost; waiting up to {}",
        seconds(wait)
    );
    let started = Instant::now();
    loop {
        let lost = store.relay_lag().await?.lost;
        if lost.is_empty() {
            println!(
                "every stream holds what it acknowledged again ({} after asking)",
                seconds(started.elapsed())
            );
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() >= wait {
            println!(
                "{} partition stream(s) still lost after {}: is a relay running (the bus, or `edupulse publish`)?",
                lost.len(),
                seconds(wait)
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
