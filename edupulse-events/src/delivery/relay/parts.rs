//! What a relay is made of, as its worker sees it.

use std::sync::{Arc, Mutex};

use crate::broker::Publisher;
use crate::delivery::relay::config::RelayConfig;
use crate::delivery::relay::ledger::Failures;
use crate::store::EventStore;

/// The store a relay reads, the publisher it sends to, its settings, and the failed events'
/// attempts it keeps from one tenure to the next.
pub(crate) struct Parts {
    pub(crate) store: EventStore,
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) config: RelayConfig,
    pub(crate) failing: Mutex<Failures>,
}
