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
                eprintln!("edupulse: {error}");
                let mut source = error.source();
                while let Some(cause) = source {
                    eprintln!("  caused by: {cause}");
                    source = cause.source();
                }
                ExitCode::from(1)
            }
        }
    }
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
