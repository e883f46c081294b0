//! `edupulse tail [--from POSITION] [--type T]… [--aggregate ID] [--limit N] [--follow]`.

use std::io::{ErrorKind, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::ArgMatches;
use edupulse_events::{EventError, RecordStream, StoredRecord, StreamPosition, Uuid};
use futures_util::StreamExt;

use crate::connect;
use crate::failure::Failure;

/// How often `--follow` looks for new events.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

/// Which events to print.
struct Filter {
    after: i64,
    types: Vec<String>,
    aggregate: Option<Uuid>,
}

impl Filter {
    /// Whether the stream left it to the filter to pass `record` over (the aggregate's
    /// stream reads by sequence, without the position and the types).
    fn passes(&self, record: &StoredRecord) -> bool {
        self.aggregate.is_none()
            || (record.position.global_position > self.after
                && (self.types.is_empty() || self.types.contains(&record.envelope.event_type)))
    }
}

pub(crate) async fn run(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store(matches).await?;
    let filter = Filter {
        after: matches.get_one::<i64>("from").copied().unwrap_or(0),
        types: matches.get_many::<String>("type").map(|t| t.cloned().collect()).unwrap_or_default(),
        aggregate: matches.get_one::<Uuid>("aggregate").copied(),
    };
    let follow = matches.get_flag("follow");
    let start = match filter.after {
        0 => StreamPosition::START,
        after => store
            .position_of(after)
            .await?
            .ok_or_else(|| Failure::Usage(format!("no event at global position {after}")))?,
    };
    let mut records: RecordStream = match filter.aggregate {
        // Followed, an aggregate without events yet is waited for.
        Some(id) if !follow && store.current_sequence(id).await? == 0 => {
            return Err(Failure::Usage(format!("aggregate {id} has no events")));
        }
        Some(id) => store.aggregate_records(id, 1),
        None => {
            let all = store.records(start);
            if filter.types.is_empty() { all } else { all.of_types(filter.types.clone()) }
        }
    };
    if follow {
        records = records.follow(FOLLOW_INTERVAL);
    }
    let mut left = matches.get_one::<u64>("limit").copied().unwrap_or(u64::MAX);
    let stdout = std::io::stdout();
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    while left > 0 {
        let record = tokio::select! {
            _ = &mut stop => break,
            record = records.next() => match record {
                Some(record) => record,
                None => break,
            },
        };
        let record = match record {
            Ok(record) => record,
            // The page could not be read: the stream would read it again at once, and fail
            // again, for ever.
            Err(e @ (EventError::Database(_) | EventError::Connect { .. } | EventError::Config(_))) => {
                return Err(e.into());
            }
            // A row whose stored JSON is broken: say so, and go on after it.
            Err(e) => {
                eprintln!("edupulse: {e}");
                continue;
            }
        };
        if !filter.passes(&record) {
            continue;
        }
        let line = serde_json::to_string(&record.envelope)?;
        let mut out = stdout.lock();
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => left -= 1,
            // The reader went away (`edupulse tail | head`): done.
            Err(e) if e.kind() == ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}
