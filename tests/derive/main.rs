//! `#[derive(DomainEvent)]` where it compiles: every attribute and the values it produces,
//! enums of events, and an expansion that is clean under strict lints in the user's crate.
//! The misuses that must not compile are the trybuild suite's (`tests/compiletest.rs`); these
//! are ordinary tests so that the trybuild suite only needs `cargo check`.
// The strict lints of `lint_clean`, for the whole crate (trybuild's `-A dead_code` kept).
#![deny(warnings, unused_qualifications, missing_docs, unreachable_pub, rust_2018_idioms)]
#![allow(dead_code)]

mod enum_dispatch;
mod every_attribute;
pub mod lint_clean;
