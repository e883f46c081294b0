//! The command line: subcommands, their arguments and their help.

use clap::builder::NonEmptyStringValueParser;
use clap::{Arg, ArgAction, Command, value_parser};
use edupulse_events::Uuid;

/// The `edupulse` command.
pub(crate) fn command() -> Command {
    Command::new("edupulse")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Operate an edupulse-events store: migrations, status, the log, publication to NATS JetStream")
        .after_help(
            "Exit codes: 0 done, 1 failed (database or broker), 2 bad usage (also an argument that names \
             nothing: a position without an event, an empty range, an aggregate without events, a schema or \
             database holding no store), 3 `migrate --check` found pending migrations.",
        )
        .subcommand_required(true)
        .arg_required_else_help(true)
        .arg(
            Arg::new("database-url")
                .long("database-url")
                .env("DATABASE_URL")
                .hide_env_values(true)
                .global(true)
                .help("The store: postgres://… or sqlite:…"),
        )
        .arg(
            Arg::new("schema")
                .long("schema")
                .global(true)
                .default_value("edupulse")
                .help("The PostgreSQL schema holding the store's tables"),
        )
        .subcommand(
            Command::new("migrate")
                .about("Apply the store's migrations")
                .arg(flag("check", "Apply nothing; exit 3 when migrations are pending")),
        )
        .subcommand(Command::new("status").about(STATUS).arg(json()))
        .subcommand(tail())
        .subcommand(publish())
        .subcommand(republish())
        .subcommand(parked())
        .subcommand(
            Command::new("projection")
                .about("Projections' checkpoints")
                .subcommand_required(true)
                .subcommand(Command::new("list").about("Each projection's checkpoint and backlog").arg(json()))
                .subcommand(
                    Command::new("reset")
                        .about("Have a projection rebuilt: its runner's next batch empties the read model and starts over")
                        .arg(Arg::new("name").value_name("NAME").required(true).help("The projection's name")),
                ),
        )
}

const STATUS: &str = "The store at a glance: migrations, events, publication per partition, parked events, \
                      projections, and the transaction holding the horizon back";

fn tail() -> Command {
    Command::new("tail")
        .about("Print the global stream as JSON lines (the message body of each event)")
        .arg(
            Arg::new("from")
                .long("from")
                .value_name("POSITION")
                .value_parser(value_parser!(i64).range(0..))
                .default_value("0")
                .help("Start after the event at this global position (0: from the first)"),
        )
        .arg(
            Arg::new("type")
                .long("type")
                .value_name("EVENT_TYPE")
                .value_parser(NonEmptyStringValueParser::new())
                .action(ArgAction::Append)
                .help("Only events of this type (repeatable)"),
        )
        .arg(
            Arg::new("aggregate")
                .long("aggregate")
                .value_name("ID")
                .value_parser(parse_uuid)
                .help("Only this aggregate's events, in its order (it must have some, unless --follow)"),
        )
        .arg(
            Arg::new("limit")
                .long("limit")
                .value_name("N")
                .value_parser(value_parser!(u64).range(1..))
                .help("Stop after N events"),
        )
        .arg(flag("follow", "Keep printing new events as they are committed, until Ctrl-C"))
}

fn publish() -> Command {
    Command::new("publish")
        .about("Run the standalone publisher: the store's log to NATS JetStream, with a progress line")
        .arg(nats_url())
        .arg(
            Arg::new("seconds")
                .long("seconds")
                .value_parser(value_parser!(u64).range(1..))
                .help("Stop after this many seconds (default: at Ctrl-C)"),
        )
        .arg(
            Arg::new("stream")
                .long("stream")
                .requires("subject")
                .help("Create or update this JetStream stream first (with --subject)"),
        )
        .arg(
            Arg::new("subject")
                .long("subject")
                .action(ArgAction::Append)
                .requires("stream")
                .help("A subject of --stream (repeatable; wildcards allowed)"),
        )
}

fn republish() -> Command {
    Command::new("republish")
        .about("Send what a stream lost to JetStream again (--lost), or a range of the log (--from)")
        .long_about(
            "With --lost: ask the relays to send again what their streams lost. A relay that finds a stream \
             holding less than it acknowledged (deleted, restored from an older copy, a server that lost \
             power before syncing) holds the partitions concerned and reports them (`edupulse status`); \
             asked, the relay holding each reads which of its events the stream still holds and sends the \
             others again, in order, then publishes the partition again. This waits until every relay is \
             done (exit 0), or --wait seconds (exit 1). A relay must be running.\n\n\
             With --from: send the events from --from to --to (both included; to the end without --to) to \
             JetStream again, in stream order. Each message carries its event id as Nats-Msg-Id: an event the \
             stream still holds inside its duplicate window (2 minutes by default) is dropped by the server \
             and counted as a duplicate; outside the window it is stored a second time. Stop the publishers \
             first, or newer events of the same aggregates may land before the republished ones.",
        )
        .arg(nats_url())
        .arg(
            Arg::new("lost")
                .long("lost")
                .action(ArgAction::SetTrue)
                .conflicts_with_all(["from", "to"])
                .required_unless_present("from")
                .help("Ask the relays to send again what their streams lost"),
        )
        .arg(
            Arg::new("wait")
                .long("wait")
                .value_name("SECONDS")
                .requires("lost")
                .default_value("120")
                .value_parser(value_parser!(u64).range(1..))
                .help("With --lost: how long to wait for the relays"),
        )
        .arg(
            Arg::new("from")
                .long("from")
                .value_name("POSITION")
                .value_parser(value_parser!(i64).range(1..))
                .help("The global position of the first event to send"),
        )
        .arg(
            Arg::new("to")
                .long("to")
                .value_name("POSITION")
                .requires("from")
                .value_parser(value_parser!(i64).range(1..))
                .help("The global position of the last event to send"),
        )
}

fn parked() -> Command {
    Command::new("parked")
        .about("Events the broker refused for good, and those waiting behind them")
        .subcommand_required(true)
        .subcommand(
            Command::new("list")
                .about("List parked events, oldest first")
                .arg(
                    Arg::new("limit")
                        .long("limit")
                        .value_parser(value_parser!(u32).range(1..))
                        .default_value("100"),
                )
                .arg(json()),
        )
        .subcommand(
            Command::new("requeue")
                .about("Publish parked aggregates again once the cause is fixed")
                .arg(
                    Arg::new("events")
                        .value_name("POSITION|EVENT_ID")
                        .num_args(1..)
                        .value_parser(parse_parked)
                        .required_unless_present("all")
                        .conflicts_with("all")
                        .help("Parked events, by global position or event id: their aggregates are re-queued whole"),
                )
                .arg(flag("all", "Every parked aggregate")),
        )
}

fn nats_url() -> Arg {
    Arg::new("nats-url")
        .long("nats-url")
        .env("NATS_URL")
        .hide_env_values(true)
        .help("The NATS server: nats://…")
}

fn json() -> Arg {
    flag("json", "Print JSON for machines")
}

fn flag(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).action(ArgAction::SetTrue).help(help)
}

/// A parked event named on the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Parked {
    Position(i64),
    EventId(Uuid),
}

fn parse_parked(text: &str) -> Result<Parked, String> {
    match text.parse::<i64>() {
        Ok(position) => Ok(Parked::Position(position)),
        Err(_) => {
            parse_uuid(text).map(Parked::EventId).map_err(|_| "a global position or an event id".into())
        }
    }
}

fn parse_uuid(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text).map_err(|e| format!("not a UUID: {e}"))
}
