//! `edupulse migrate [--check]`.

use std::process::ExitCode;

use clap::ArgMatches;

use crate::connect;
use crate::failure::Failure;

pub(crate) async fn run(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    let store = connect::store_to_migrate(matches).await?;
    let before = store.migrations().await?;
    if matches.get_flag("check") {
        if before.pending.is_empty() {
            println!("up to date: {} migrations applied", before.applied.len());
            return Ok(ExitCode::SUCCESS);
        }
        println!("pending migrations: {}", list(&before.pending));
        return Ok(ExitCode::from(3));
    }
    store.migrate().await?;
    if before.pending.is_empty() {
        println!("up to date: {} migrations applied", before.applied.len());
    } else {
        println!("applied migrations: {}", list(&before.pending));
    }
    Ok(ExitCode::SUCCESS)
}

fn list(versions: &[i64]) -> String {
    versions.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}
