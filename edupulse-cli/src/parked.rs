//! `edupulse parked list [--limit N] [--json]`,
//! `edupulse parked requeue (POSITION|EVENT_ID…|--all)`.

use std::process::ExitCode;

use clap::ArgMatches;
use edupulse_events::{EventStore, ParkedEvent, Requeue};
use serde_json::{Value, json};

use crate::args::Parked;
use crate::connect;
use crate::failure::Failure;
use crate::status::seconds;

pub(crate) async fn run(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    match matches.subcommand() {
        Some(("list", m)) => list(m).await,
        Some(("requeue", m)) => requeue(m).await,
        _ => Err(Failure::Usage("`edupulse parked list` or `edupulse parked requeue`".into())),
    }
}

async fn list(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store(matches).await?;
    let limit = matches.get_one::<u32>("limit").copied().unwrap_or(100);
    let parked = store.parked_events(limit).await?;
    if matches.get_flag("json") {
        let list: Vec<Value> = parked.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if parked.is_empty() {
        println!("no parked events");
    }
    for p in &parked {
        let why = match p.blocked_by {
            None => format!("refused after {} attempts: {}", p.attempts, p.reason),
            Some(position) => format!("waits behind {position}"),
        };
        let requeued = if p.requeued { ", re-queued" } else { "" };
        println!(
            "{:>12}  aggregate {} sequence {}  partition {:>2}  parked {} ago{requeued}  {why}",
            p.global_position,
            p.aggregate_id,
            p.sequence,
            p.partition,
            seconds(p.age)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn requeue(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store(matches).await?;
    let which = match matches.get_many::<Parked>("events") {
        Some(named) if !matches.get_flag("all") => {
            Requeue::Positions(positions(&store, named.copied()).await?)
        }
        _ => Requeue::All,
    };
    let requeued = store.requeue_parked(which).await?;
    println!("re-queued {requeued} aggregate(s): the relay holding their partition publishes them again");
    Ok(ExitCode::SUCCESS)
}

/// The global positions of the parked events named by position or by event id. A position or
/// an id that names no parked event is a usage error: nothing is re-queued then.
async fn positions(store: &EventStore, named: impl Iterator<Item = Parked>) -> Result<Vec<i64>, Failure> {
    let parked = store.parked_events(u32::MAX).await?;
    let mut positions = Vec::new();
    for named in named {
        match named {
            Parked::Position(position) => {
                if !parked.iter().any(|p| p.global_position == position) {
                    return Err(not_parked(store, position).await);
                }
                positions.push(position);
            }
            Parked::EventId(id) => {
                let found = parked.iter().find(|p| p.event_id == id);
                let found = found.ok_or_else(|| Failure::Usage(format!("no parked event with id {id}")))?;
                positions.push(found.global_position);
            }
        }
    }
    Ok(positions)
}

/// Why `position`, which is not among the parked events, cannot be re-queued.
async fn not_parked(store: &EventStore, position: i64) -> Failure {
    match store.position_of(position).await {
        Ok(None) => Failure::Usage(format!("no event at global position {position}")),
        Ok(Some(_)) => Failure::Usage(format!(
            "the event at global position {position} is not parked: see `edupulse parked list`"
        )),
        Err(e) => e.into(),
    }
}

fn to_json(p: &ParkedEvent) -> Value {
    json!({
        "global_position": p.global_position,
        "event_id": p.event_id,
        "aggregate_id": p.aggregate_id,
        "sequence": p.sequence,
        "partition": p.partition,
        "blocked_by": p.blocked_by,
        "attempts": p.attempts,
        "reason": p.reason,
        "requeued": p.requeued,
        "parked_seconds_ago": p.age.as_secs_f64(),
    })
}
