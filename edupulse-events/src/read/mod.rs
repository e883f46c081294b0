//! The read side: projections that follow the store's global stream, exactly once.

mod projection;

pub use self::projection::{Projection, ProjectionRunner, UndecodablePolicy};
