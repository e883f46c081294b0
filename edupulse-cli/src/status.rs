//! `edupulse status [--json]`.

use std::process::ExitCode;
use std::time::Duration;

use clap::ArgMatches;
use edupulse_events::{PartitionStatus, StoreStatus};
use serde_json::{Value, json};

use crate::connect;
use crate::failure::Failure;
use crate::projection;

pub(crate) async fn run(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store(matches).await?;
    let status = store.status().await?;
    if matches.get_flag("json") {
        println!("{}", serde_json::to_string_pretty(&to_json(&status))?);
    } else {
        print_text(&status);
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(status: &StoreStatus) -> Value {
    let lag = &status.lag;
    json!({
        "backend": status.backend,
        "schema": status.schema,
        "schema_version": status.migrations.applied.last(),
        "migrations": { "applied": status.migrations.applied, "pending": status.migrations.pending },
        "events": status.events,
        "aggregates": status.aggregates,
        "last_position": status.last_position,
        "publication": {
            "pending": lag.pending,
            "oldest_pending_seconds": lag.oldest_pending_age.map(|a| a.as_secs_f64()),
            "held_back": lag.held_back,
            "parked": lag.parked,
            "oldest_write_transaction": lag.oldest_write_transaction.as_ref().map(|t| json!({
                "pid": t.pid,
                "application_name": t.application_name,
                "state": t.state,
                "age_seconds": t.age.as_secs_f64(),
            })),
            "lost": lag.lost.iter().map(|m| json!({
                "partition": m.partition,
                "stream": m.stream,
                "acknowledged": m.acknowledged,
                "held_sequence": m.held_sequence,
                "behind_since": m.behind_since,
                "repair_requested": m.repair_requested,
            })).collect::<Vec<_>>(),
        },
        "partitions": status.partitions.iter().map(partition_json).collect::<Vec<_>>(),
        "projections": status.projections.iter().map(projection::to_json).collect::<Vec<_>>(),
    })
}

fn partition_json(p: &PartitionStatus) -> Value {
    json!({
        "partition": p.partition,
        "checkpoint": { "transaction_id": p.checkpoint.transaction_id, "global_position": p.checkpoint.global_position },
        "moved_seconds_ago": p.age.as_secs_f64(),
        "pending": p.pending,
    })
}

fn print_text(status: &StoreStatus) {
    let schema = status.schema.as_deref().map(|s| format!(" (schema {s})")).unwrap_or_default();
    println!("backend      {}{schema}", status.backend);
    let m = &status.migrations;
    let version = m.applied.last().map_or_else(|| "none".to_owned(), i64::to_string);
    println!(
        "migrations   schema version {version}: {} applied, {} pending",
        m.applied.len(),
        m.pending.len()
    );
    println!(
        "events       {} in {} aggregates, last global position {}",
        status.events, status.aggregates, status.last_position
    );
    let lag = &status.lag;
    let oldest =
        lag.oldest_pending_age.map(|a| format!(", oldest waiting {}", seconds(a))).unwrap_or_default();
    println!(
        "publication  {} pending{oldest}, {} held back, {} parked",
        lag.pending, lag.held_back, lag.parked
    );
    if let Some(t) = &lag.oldest_write_transaction {
        println!(
            "  the horizon is held by pid {} ({}), {} for {}: end it or wait",
            t.pid,
            if t.application_name.is_empty() { "no application name" } else { &t.application_name },
            t.state,
            seconds(t.age)
        );
    }
    for m in &lag.lost {
        println!(
            "  LOST: stream {} holds up to sequence {} but acknowledged {} to partition {}{}",
            m.stream,
            m.held_sequence.map_or_else(|| "?".to_owned(), |h| h.to_string()),
            m.acknowledged,
            m.partition,
            if m.repair_requested {
                ": being sent again"
            } else {
                ": held; `edupulse republish --lost` sends it again"
            }
        );
    }
    let behind: Vec<&PartitionStatus> = status.partitions.iter().filter(|p| p.pending > 0).collect();
    println!("partitions   {} ({} with pending events)", status.partitions.len(), behind.len());
    for p in behind {
        println!(
            "  partition {:>2}: {} pending, checkpoint {}:{} moved {} ago",
            p.partition,
            p.pending,
            p.checkpoint.transaction_id,
            p.checkpoint.global_position,
            seconds(p.age)
        );
    }
    println!("projections  {}", status.projections.len());
    projection::print_table(&status.projections);
}

/// A duration for people: seconds with one decimal.
pub(crate) fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
