//! `TORTURE_LOG=1`: the library's warnings and errors on standard error, each with the
//! seconds since the harness started, to read a finding against the faults' times (which
//! the harness prints the same way). A subscriber of its own: the suite has no
//! `tracing-subscriber`.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Seconds since the harness started (or since the first call).
pub(crate) fn elapsed() -> f64 {
    STARTED.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Whether `TORTURE_LOG` asks for the log.
pub(crate) fn wanted() -> bool {
    std::env::var("TORTURE_LOG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Installs the subscriber when `TORTURE_LOG` asks for it (once per process).
pub(crate) fn install() {
    elapsed();
    if wanted() {
        let _ = tracing::subscriber::set_global_default(Warnings::default());
    }
}

/// Prints a line of the harness's own, timed like the library's.
pub(crate) fn note(text: &str) {
    if wanted() {
        eprintln!("[{:8.3}] harness: {text}", elapsed());
    }
}

#[derive(Default)]
struct Warnings {
    next_span: AtomicU64,
}

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Warnings {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN && metadata.target().starts_with("edupulse_events")
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        eprintln!("[{:8.3}] {}{}", elapsed(), event.metadata().level(), line.0);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
