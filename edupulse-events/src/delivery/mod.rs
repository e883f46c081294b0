//! Delivery: committing events with the caller's writes ([`EventBus`]) and publishing the
//! store's log to the broker ([`LogRelay`]). The one layer that uses both the store and the
//! broker.

mod bus;
mod message;
mod outstanding;
mod relay;
mod republish;
mod watch;

pub use self::bus::{BusConfig, BusTransaction, Closed, Committed, EventBus, Receipt};
pub use self::relay::{LogRelay, RelayConfig, RelayPass};
pub use self::republish::Republished;
