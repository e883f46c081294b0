//! Implementation detail of [edupulse-events](https://docs.rs/edupulse-events): the
//! `#[derive(DomainEvent)]` macro. Use it through `edupulse_events::DomainEvent`.
//!
//! Layout, as in thiserror-impl and serde_derive: `attr.rs` reads `#[event(...)]`,
//! `ast.rs` builds the model, `valid.rs` checks it, `expand.rs` generates code, and
//! `fallback.rs` emits a stand-in impl next to compile errors.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod fallback;
mod symbol;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Derives `edupulse_events::DomainEvent`; see the documentation of `edupulse-events`.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).unwrap_or_else(syn::Error::into_compile_error).into()
}
