//! A stand-in impl emitted next to the compile errors, so that the user sees the real
//! mistakes and not a cascade of "`DomainEvent` is not implemented" errors after them.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput};

/// The stand-in impls; empty for inputs no impl can be written for (generics, unions).
pub(crate) fn expand(input: &DeriveInput) -> TokenStream {
    if !input.generics.params.is_empty() || matches!(input.data, Data::Union(_)) {
        return TokenStream::new();
    }
    let ident = &input.ident;
    let schema = matches!(input.data, Data::Struct(_)).then(|| {
        quote! {
            #[allow(unused_qualifications)]
            impl ::edupulse_events::__private::EventSchema for #ident {
                const EVENT_TYPE: &'static str = "";
                const ALIASES: &'static [&'static str] = &[];
                const VERSION: u32 = 1;
                const SUBJECT: &'static str = "";
                const KEYS: &'static [&'static str] = &[];
                fn decode_version(
                    _: &str,
                    _: u32,
                    _: &[u8],
                ) -> ::edupulse_events::__private::Result<Self, ::edupulse_events::__private::EventError> {
                    ::core::unreachable!()
                }
            }
        }
    });
    quote! {
        #[allow(unused_qualifications)]
        impl ::edupulse_events::__private::DomainEvent for #ident {
            const EVENT_TYPES: &'static [&'static str] = &[];
            const ACCEPTED_TYPES: &'static [&'static str] = &[];
            const SUBJECTS: &'static [&'static str] = &[];
            fn event_type(&self) -> &'static str { ::core::unreachable!() }
            fn subject(&self) -> &'static str { ::core::unreachable!() }
            fn schema_version(&self) -> u32 { ::core::unreachable!() }
            fn aggregate_id(&self) -> ::edupulse_events::__private::Option<::edupulse_events::__private::Uuid> {
                ::core::unreachable!()
            }
            fn promoted_keys(&self) -> ::edupulse_events::__private::Vec<::edupulse_events::__private::PromotedKey> {
                ::core::unreachable!()
            }
            fn to_payload(&self) -> ::edupulse_events::__private::Result<
                ::edupulse_events::__private::Box<::edupulse_events::__private::RawValue>,
                ::edupulse_events::__private::EventError,
            > {
                ::core::unreachable!()
            }
            fn decode(
                _: &str,
                _: u32,
                _: &[u8],
            ) -> ::edupulse_events::__private::Result<Self, ::edupulse_events::__private::EventError> {
                ::core::unreachable!()
            }
        }
        #schema
    }
}
