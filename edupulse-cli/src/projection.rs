//! `edupulse projection list [--json]`, `edupulse projection reset NAME`.

use std::process::ExitCode;

use clap::ArgMatches;
use edupulse_events::ProjectionStatus;
use serde_json::{Value, json};

use crate::connect;
use crate::failure::Failure;
use crate::status::seconds;

pub(crate) async fn run(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let m = match matches.subcommand() {
        Some(("list", m)) => m,
        Some(("reset", m)) => return reset(m).await,
        _ => return Err(Failure::Usage("see `edupulse projection --help`".into())),
    };
    let store = connect::store(m).await?;
    let projections = store.status().await?.projections;
    if m.get_flag("json") {
        let list: Vec<Value> = projections.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_table(&projections);
    }
    Ok(ExitCode::SUCCESS)
}

async fn reset(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store(matches).await?;
    let name = matches.get_one::<String>("name").map_or("", String::as_str);
    if !store.request_rebuild(name).await? {
        return Err(Failure::Usage(format!(
            "no projection named `{name}` has a checkpoint: see `edupulse projection list`"
        )));
    }
    println!(
        "projection `{name}`: rebuild requested; its runner's next batch empties the read model and applies \
         every event again"
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn to_json(p: &ProjectionStatus) -> Value {
    json!({
        "name": p.name,
        "checkpoint": { "transaction_id": p.checkpoint.transaction_id, "global_position": p.checkpoint.global_position },
        "moved_seconds_ago": p.age.as_secs_f64(),
        "behind": p.behind,
        "rebuild_requested": p.rebuild_requested,
    })
}

pub(crate) fn print_table(projections: &[ProjectionStatus]) {
    for p in projections {
        if p.rebuild_requested {
            println!("  {:<32} rebuild requested {} ago, not started yet", p.name, seconds(p.age));
            continue;
        }
        println!(
            "  {:<32} checkpoint {}:{}, {} events behind, moved {} ago",
            p.name,
            p.checkpoint.transaction_id,
            p.checkpoint.global_position,
            p.behind,
            seconds(p.age)
        );
    }
}
