//! The write side: aggregates, the repository that loads and saves them through the bus, and
//! the given/when/then harness that tests them.

pub(crate) mod aggregate;
#[cfg(feature = "sqlite")]
pub mod testing;

pub use self::aggregate::{Aggregate, CommandError, Loaded, Repository};
