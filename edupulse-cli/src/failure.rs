//! Why a command failed, and the exit code that says so.

use std::error::Error;
use std::fmt;
use std::process::ExitCode;

use edupulse_events::EventError;

/// A failed command.
pub(crate) enum Failure {
    /// Bad usage: exit code 2.
    Usage(String),
    /// The work failed: exit code 1.
    Failed(Box<dyn Error + Send + Sync>),
}

impl Failure {
    /// Prints the failure and its causes to stderr; the exit code.
    pub(crate) fn report(self) -> ExitCode {
        match self {
            Self::Usage(message) => {
                eprintln!("edupulse: {message}");
                ExitCode::from(2)
            }
            Self::Failed(error) => {
                for line in lines(&*error) {
                    eprintln!("{line}");
                }
                ExitCode::from(1)
            }
        }
    }
}

/// The lines that report `error`: the error, then each cause whose text the lines before do
/// not hold already (our errors name their cause in their message, and so do the drivers':
/// printed again, one cause would show three times).
fn lines(error: &(dyn Error + 'static)) -> Vec<String> {
    let mut said = error.to_string();
    let mut lines = vec![format!("edupulse: {said}")];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !said.contains(&text) {
            lines.push(format!("  caused by: {text}"));
            said.push_str(&text);
        }
        source = cause.source();
    }
    lines
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(message) => write!(f, "usage: {message}"),
            Self::Failed(error) => write!(f, "{error}"),
        }
    }
}

impl From<EventError> for Failure {
    fn from(error: EventError) -> Self {
        match error {
            // An invalid setting given on the command line (a schema name, say).
            EventError::Config(message) => Self::Usage(message),
            other => Self::Failed(Box::new(other)),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Self::Failed(Box::new(error))
    }
}

impl From<serde_json::Error> for Failure {
    fn from(error: serde_json::Error) -> Self {
        Self::Failed(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        // As `EventError::Connect` over sqlx over io: each message holds the next.
        let io = Layer("Connection refused (os error 111)", None);
        let sqlx =
            Layer("error communicating with database: Connection refused (os error 111)", Some(Box::new(io)));
        let ours = Layer(
            "cannot connect to PostgreSQL at 127.0.0.1:1: connection refused (error communicating with database: \
             Connection refused (os error 111)); is PostgreSQL running?",
            Some(Box::new(sqlx)),
        );
        assert_eq!(lines(&ours).len(), 1, "{:?}", lines(&ours));
        // A cause the message does not name is printed.
        let hidden = Layer("the reply timed out", None);
        let outer = Layer("publish failed", Some(Box::new(hidden)));
        assert_eq!(lines(&outer), ["edupulse: publish failed", "  caused by: the reply timed out"]);
    }
}
