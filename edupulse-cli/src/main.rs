//! `edupulse`: the operators' command line for an edupulse-events store and its publication
//! to NATS JetStream. `edupulse --help` lists the subcommands, `edupulse help SUBCOMMAND`
//! explains one.
//!
//! The store is named by `--database-url` or `DATABASE_URL`, the broker by `--nats-url` or
//! `NATS_URL`; neither value is ever printed (help shows the variable's name only).
//!
//! Exit codes, for scripts: 0 done; 1 failed (the database or the broker); 2 bad usage (a
//! missing URL, an invalid argument, an argument that names nothing: a position without an
//! event or without a parked event, a range that ends before it starts, an aggregate without
//! events, a projection without a checkpoint, a schema or database that holds no store); 3
//! `migrate --check` found migrations to apply.

mod args;
mod connect;
mod failure;
mod migrate;
mod parked;
mod projection;
mod publish;
mod status;
mod tail;

use std::process::ExitCode;

use clap::ArgMatches;

use crate::failure::Failure;

fn main() -> ExitCode {
    let matches = args::command().get_matches();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return Failure::from(e).report(),
    };
    match runtime.block_on(run(&matches)) {
        Ok(code) => code,
        Err(failure) => failure.report(),
    }
}

async fn run(matches: &ArgMatches) -> Result<ExitCode, Failure> {
    match matches.subcommand() {
        Some(("migrate", m)) => migrate::run(m).await,
        Some(("status", m)) => status::run(m).await,
        Some(("tail", m)) => tail::run(m).await,
        Some(("publish", m)) => publish::run(m).await,
        Some(("republish", m)) => publish::republish(m).await,
        Some(("parked", m)) => parked::run(m).await,
        Some(("projection", m)) => projection::run(m).await,
        _ => Err(Failure::Usage("a subcommand is needed: see `edupulse --help`".into())),
    }
}
