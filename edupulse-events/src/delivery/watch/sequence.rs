//! Stream sequences.

/// A message's sequence in a broker stream (1 for its first message; 0 for none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StreamSequence(u64);

impl StreamSequence {
    /// A sequence as the broker gives it.
    pub(crate) const fn new(sequence: u64) -> Self {
        Self(sequence)
    }

    /// A sequence as the store keeps it (`bigint`; a negative one is none).
    pub(crate) fn from_stored(sequence: i64) -> Self {
        Self(u64::try_from(sequence).unwrap_or(0))
    }

    /// As the store keeps it.
    pub(crate) fn stored(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// As the broker takes it.
    pub(crate) const fn get(self) -> u64 {
        self.0
    }

    /// The sequence before it (none before the first).
    pub(crate) fn before(self) -> Self {
        Self(self.0.saturating_sub(1))
    }
}
