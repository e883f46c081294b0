//! Generates the impls from a model that `valid.rs` has accepted.

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, Ident, Type};

use crate::ast::{Enum, Input, Struct, Variant};
use crate::attr::Upcast;
use crate::ctxt::Ctxt;
use crate::{fallback, valid};

/// Entry point: parse, validate, expand.
pub(crate) fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let cx = Ctxt::default();
    let model = Input::from_syn(&cx, input);
    if let Some(model) = &model {
        valid::validate(&cx, model);
    }
    match (model, cx.has_errors()) {
        (Some(Input::Struct(s)), false) => Ok(expand_struct(&s)),
        (Some(Input::Enum(e)), false) => Ok(expand_enum(&e)),
        _ => {
            let stand_in = fallback::expand(input);
            let errors = match cx.check() {
                Err(e) => e.into_compile_error(),
                // Kept defensively: the model is missing only for a union, which is an error.
                Ok(()) => TokenStream::new(),
            };
            Ok(quote! { #errors #stand_in })
        }
    }
}

/// `n` as an unsuffixed integer literal (`2`, not `2u32`).
fn u32_lit(n: u32) -> Literal {
    Literal::u32_unsuffixed(n)
}

/// The bodies of the items of `impl DomainEvent`, the parts that differ between a struct
/// and an enum.
struct DomainEventParts {
    /// Whether the accessors `event_type`, `subject` and `schema_version` get `#[inline]`.
    inline: bool,
    event_types: TokenStream,
    accepted_types: TokenStream,
    subjects: TokenStream,
    event_type: TokenStream,
    subject: TokenStream,
    schema_version: TokenStream,
    aggregate_id: TokenStream,
    promoted_keys: TokenStream,
    to_payload: TokenStream,
    decode: TokenStream,
}

/// The `impl DomainEvent` for `ident`, made of the given parts.
fn domain_event_impl(ident: &Ident, parts: &DomainEventParts) -> TokenStream {
    let DomainEventParts { event_types, accepted_types, subjects, .. } = parts;
    let accessors = domain_event_accessors(parts);
    let codec = domain_event_codec(parts);
    quote! {
        #[automatically_derived]
        #[allow(unused_qualifications)]
        impl ::edupulse_events::__private::DomainEvent for #ident {
            const EVENT_TYPES: &'static [&'static str] = #event_types;
            const ACCEPTED_TYPES: &'static [&'static str] = #accepted_types;
            const SUBJECTS: &'static [&'static str] = #subjects;

            #accessors
            #codec
        }
    }
}

/// The methods `event_type`, `subject`, `schema_version`, `aggregate_id` and `promoted_keys`.
fn domain_event_accessors(parts: &DomainEventParts) -> TokenStream {
    let DomainEventParts { event_type, subject, schema_version, aggregate_id, promoted_keys, .. } = parts;
    let inline = parts.inline.then(|| quote!(#[inline]));
    quote! {
        #inline
        fn event_type(&self) -> &'static str {
            #event_type
        }

        #inline
        fn subject(&self) -> &'static str {
            #subject
        }

        #inline
        fn schema_version(&self) -> u32 {
            #schema_version
        }

        fn aggregate_id(&self) -> ::edupulse_events::__private::Option<::edupulse_events::__private::Uuid> {
            #aggregate_id
        }

        fn promoted_keys(&self) -> ::edupulse_events::__private::Vec<::edupulse_events::__private::PromotedKey> {
            #promoted_keys
        }
    }
}

/// The methods `to_payload` and `decode`.
fn domain_event_codec(parts: &DomainEventParts) -> TokenStream {
    let DomainEventParts { to_payload, decode, .. } = parts;
    quote! {
        fn to_payload(&self) -> ::edupulse_events::__private::Result<
            ::edupulse_events::__private::Box<::edupulse_events::__private::RawValue>,
            ::edupulse_events::__private::EventError,
        > {
            #to_payload
        }

        fn decode(
            __event_type: &str,
            __version: u32,
            __payload: &[u8],
        ) -> ::edupulse_events::__private::Result<Self, ::edupulse_events::__private::EventError> {
            #decode
        }
    }
}

/// The error `decode` returns for an event type name that `Self` does not accept.
fn unknown_event_type() -> TokenStream {
    quote! {
        ::edupulse_events::__private::Result::Err(::edupulse_events::__private::unknown(
            __event_type,
            <Self as ::edupulse_events::__private::DomainEvent>::ACCEPTED_TYPES,
        ))
    }
}

/// The impls for an event struct: `DomainEvent`, `EventSchema`, and the check on `previous`.
fn expand_struct(s: &Struct<'_>) -> TokenStream {
    let ident = &s.original.ident;
    let event_type = s.event_type();
    let aliases = s.aliases();
    let subject = s.subject();
    let version_lit = u32_lit(s.version());
    let domain_event = domain_event_impl(
        ident,
        &DomainEventParts {
            inline: true,
            event_types: quote!(&[#event_type]),
            accepted_types: quote!(&[#event_type #(, #aliases)*]),
            subjects: quote!(&[#subject]),
            event_type: quote!(#event_type),
            subject: quote!(#subject),
            schema_version: quote!(#version_lit),
            aggregate_id: struct_aggregate_id(s),
            promoted_keys: struct_promoted_keys(s),
            to_payload: quote!(::edupulse_events::__private::to_payload(#event_type, self)),
            decode: struct_decode(&event_type, &aliases),
        },
    );
    let schema = schema_impl(s);
    let previous_check = previous_version_check(s);
    let aggregate_warning = missing_aggregate_id_warning(s);
    quote! {
        #domain_event
        #schema
        #previous_check
        #aggregate_warning
    }
}

/// A warning, on the struct's name, when no field is the aggregate id and the struct does
/// not say `no_aggregate_id`: forgetting the attribute compiles, and an append can then not
/// check that the event belongs to the aggregate it is appended to. A derive cannot emit a
/// warning of its own on stable Rust: it uses a deprecated constant, whose note is the
/// message (`#[deny(deprecated)]` makes it an error).
fn missing_aggregate_id_warning(s: &Struct<'_>) -> TokenStream {
    if s.aggregate_field().is_some() || s.attrs.no_aggregate_id.is_some() {
        return TokenStream::new();
    }
    let ident = &s.original.ident;
    let note = format!(
        "`{ident}` has no field marked `#[event(aggregate_id)]`, so an append cannot check that the \
         event belongs to the aggregate it is appended to: mark the field that holds the aggregate's \
         id, or write `#[event(no_aggregate_id)]` on the struct if the event does not carry it"
    );
    quote_spanned! {ident.span()=>
        const _: () = {
            #[deprecated(note = #note)]
            #[allow(non_upper_case_globals)]
            const no_aggregate_id_field: () = ();
            no_aggregate_id_field
        };
    }
}

/// The body of a struct's `aggregate_id`: the `aggregate_id` field as a UUID, or `None`.
fn struct_aggregate_id(s: &Struct<'_>) -> TokenStream {
    match s.aggregate_field() {
        Some(field) => {
            let member = &field.member;
            let span = field.ty.span();
            quote_spanned! {span=>
                ::edupulse_events::__private::Option::Some(
                    ::edupulse_events::__private::aggregate_uuid(&self.#member)
                )
            }
        }
        None => quote!(::edupulse_events::__private::Option::None),
    }
}

/// The body of a struct's `promoted_keys`: one `push_key` per key field.
fn struct_promoted_keys(s: &Struct<'_>) -> TokenStream {
    let keys = s.keys();
    let key_count = keys.len();
    let push_keys = keys.iter().map(|(name, field, _)| {
        let member = &field.member;
        let span = field.ty.span();
        quote_spanned! {span=>
            ::edupulse_events::__private::push_key(&mut __keys, #name, &self.#member);
        }
    });
    quote! {
        #[allow(unused_mut)]
        let mut __keys = ::edupulse_events::__private::Vec::with_capacity(#key_count);
        #(#push_keys)*
        __keys
    }
}

/// The body of a struct's `decode`: its name or an alias goes to `decode_version`.
fn struct_decode(event_type: &str, aliases: &[String]) -> TokenStream {
    let unknown = unknown_event_type();
    quote! {
        if __event_type == #event_type #(|| __event_type == #aliases)* {
            <Self as ::edupulse_events::__private::EventSchema>::decode_version(__event_type, __version, __payload)
        } else {
            #unknown
        }
    }
}

/// The `impl EventSchema` of an event struct: its constants and `decode_version`.
fn schema_impl(s: &Struct<'_>) -> TokenStream {
    let ident = &s.original.ident;
    let event_type = s.event_type();
    let aliases = s.aliases();
    let subject = s.subject();
    let version = s.version();
    let version_lit = u32_lit(version);
    let key_names = s.keys().into_iter().map(|(name, _, _)| name);
    let chain = expand_chain(s, version);
    quote! {
        #[automatically_derived]
        #[allow(unused_qualifications)]
        impl ::edupulse_events::__private::EventSchema for #ident {
            const EVENT_TYPE: &'static str = #event_type;
            const ALIASES: &'static [&'static str] = &[#(#aliases),*];
            const VERSION: u32 = #version_lit;
            const SUBJECT: &'static str = #subject;
            const KEYS: &'static [&'static str] = &[#(#key_names),*];

            fn decode_version(
                __event_type: &str,
                __version: u32,
                __payload: &[u8],
            ) -> ::edupulse_events::__private::Result<Self, ::edupulse_events::__private::EventError> {
                #chain
            }
        }
    }
}

/// With `previous = T`, a compile-time check that `T` is the shape of the version before.
fn previous_version_check(s: &Struct<'_>) -> Option<TokenStream> {
    let ident = &s.original.ident;
    let version = s.version();
    s.attrs.previous.as_ref().map(|previous| {
        let expected = u32_lit(version.saturating_sub(1));
        let message = format!(
            "`previous` of `{ident}` (version {version}) must be the shape of version {}: set \
             `#[event(version = {})]` on the previous type",
            version.saturating_sub(1),
            version.saturating_sub(1),
        );
        quote_spanned! {previous.span()=>
            const _: () = ::core::assert!(
                <#previous as ::edupulse_events::__private::EventSchema>::VERSION == #expected,
                #message
            );
        }
    })
}

/// The body of `decode_version`: the current version decodes directly; older ones go
/// through the typed `previous` type or the raw JSON steps.
fn expand_chain(s: &Struct<'_>, version: u32) -> TokenStream {
    let current = decode_current_version(version);
    let older = match &s.attrs.previous {
        Some(previous) => decode_through_previous(previous),
        // Only version 1 exists, and `current` refuses every other version.
        None if version == 1 => unsupported_version(version),
        None => decode_through_upcasts(&s.attrs.upcasts, version),
    };
    quote! {
        #current
        #older
    }
}

/// The error `decode_version` returns for a version it cannot read.
fn unsupported_version(version: u32) -> TokenStream {
    let version_lit = u32_lit(version);
    quote! {
        ::edupulse_events::__private::Result::Err(
            ::edupulse_events::__private::unsupported(__event_type, __version, #version_lit),
        )
    }
}

/// Decodes the current version directly; refuses version 0 and versions above the current.
fn decode_current_version(version: u32) -> TokenStream {
    let version_lit = u32_lit(version);
    let unsupported = unsupported_version(version);
    quote! {
        if __version == #version_lit {
            return ::edupulse_events::__private::from_slice::<Self>(__event_type, __version, __payload);
        }
        if __version == 0 || __version > #version_lit {
            return #unsupported;
        }
    }
}

/// Decodes an older version as the `previous` type, with its own chain, and converts it.
fn decode_through_previous(previous: &Type) -> TokenStream {
    let from = quote_spanned! {previous.span()=>
        <Self as ::edupulse_events::__private::From<#previous>>::from
    };
    quote! {
        <#previous as ::edupulse_events::__private::EventSchema>::decode_version(__event_type, __version, __payload)
            .map(#from)
    }
}

/// Decodes an older version as JSON, runs the `upcast` steps from it up to the current
/// version, and decodes the result.
fn decode_through_upcasts(upcasts: &[Upcast], version: u32) -> TokenStream {
    let version_lit = u32_lit(version);
    let unsupported = unsupported_version(version);
    let arms = upcast_arms(upcasts);
    // The `_` arm is never taken (validation requires a step from every older version),
    // but a `match` on a `u32` needs it.
    quote! {
        let mut __value = ::edupulse_events::__private::value_from_slice(__event_type, __version, __payload)?;
        let mut __at = __version;
        while __at < #version_lit {
            __value = match __at {
                #(#arms)*
                _ => {
                    return #unsupported;
                }
            };
            __at += 1;
        }
        ::edupulse_events::__private::from_value::<Self>(__event_type, __version, __value)
    }
}

/// One `match` arm per `upcast` step, ordered by the version it starts from.
fn upcast_arms(upcasts: &[Upcast]) -> Vec<TokenStream> {
    // A step without `from` or `with` is an error in attr.rs and never gets here; the
    // `filter_map` only avoids an unwrap.
    let mut steps: Vec<_> =
        upcasts.iter().filter_map(|u| Some((u.from.as_ref()?.value, u.with.as_ref()?))).collect();
    steps.sort_by_key(|(from, _)| *from);
    steps
        .iter()
        .map(|(from, with)| {
            let from = u32_lit(*from);
            quote_spanned! {with.span()=>
                #from => ::edupulse_events::__private::upcast(__event_type, __version, #from, #with, __value)?,
            }
        })
        .collect()
}

/// The impls for an enum of events: `DomainEvent` by dispatch to the variants, `From` each
/// event, and the compile-time checks across the variants.
fn expand_enum(e: &Enum<'_>) -> TokenStream {
    let ident = &e.original.ident;
    let idents: Vec<_> = e.variants.iter().map(|v| v.ident).collect();
    let tys_as_event: Vec<_> = e
        .variants
        .iter()
        .map(|v| {
            let ty = v.ty;
            quote_spanned!(ty.span()=> <#ty as ::edupulse_events::__private::DomainEvent>)
        })
        .collect();
    let dispatch = |method: TokenStream| dispatch(&idents, &tys_as_event, &method);
    let domain_event = domain_event_impl(
        ident,
        &DomainEventParts {
            inline: false,
            event_types: concat_lists(&tys_as_event, "EVENT_TYPES"),
            accepted_types: concat_lists(&tys_as_event, "ACCEPTED_TYPES"),
            subjects: concat_lists(&tys_as_event, "SUBJECTS"),
            event_type: dispatch(quote!(event_type)),
            subject: dispatch(quote!(subject)),
            schema_version: dispatch(quote!(schema_version)),
            aggregate_id: dispatch(quote!(aggregate_id)),
            promoted_keys: dispatch(quote!(promoted_keys)),
            to_payload: dispatch(quote!(to_payload)),
            decode: enum_decode(&idents, &tys_as_event),
        },
    );
    let from_impls = e.variants.iter().map(|v| from_impl(ident, v));
    let checks = distinct_names_checks(e).into_iter().chain(context_checks(e));
    quote! {
        #domain_event
        #(#from_impls)*
        #(#checks)*
    }
}

/// A constant block that concatenates the list `name` (such as `EVENT_TYPES`) of every variant.
fn concat_lists(tys_as_event: &[TokenStream], name: &str) -> TokenStream {
    let name = format_ident!("{}", name);
    quote! {{
        const __PARTS: &[&[&'static str]] = &[#(#tys_as_event::#name),*];
        const __N: usize = ::edupulse_events::__private::concat_len(__PARTS);
        const __ALL: [&'static str; __N] = ::edupulse_events::__private::concat_strs(__PARTS);
        &__ALL
    }}
}

/// A `match self` that calls `method` on the event of whichever variant it is.
fn dispatch(idents: &[&Ident], tys_as_event: &[TokenStream], method: &TokenStream) -> TokenStream {
    quote! {
        match self {
            #(Self::#idents(__event) => #tys_as_event::#method(__event),)*
        }
    }
}

/// The body of an enum's `decode`: the first variant whose event accepts the name decodes it.
fn enum_decode(idents: &[&Ident], tys_as_event: &[TokenStream]) -> TokenStream {
    let unknown = unknown_event_type();
    quote! {
        #(
            if #tys_as_event::accepts(__event_type) {
                return #tys_as_event::decode(__event_type, __version, __payload).map(Self::#idents);
            }
        )*
        #unknown
    }
}

/// `impl From<Event> for Enum`, wrapping the event in its variant.
fn from_impl(ident: &Ident, v: &Variant<'_>) -> TokenStream {
    let (variant, ty) = (v.ident, v.ty);
    quote! {
        #[automatically_derived]
        #[allow(unused_qualifications)]
        impl ::edupulse_events::__private::From<#ty> for #ident {
            #[inline]
            fn from(event: #ty) -> Self {
                Self::#variant(event)
            }
        }
    }
}

/// Compile-time checks that no two variants accept the same event type name or alias.
fn distinct_names_checks(e: &Enum<'_>) -> Vec<TokenStream> {
    let ident = &e.original.ident;
    let mut checks = Vec::new();
    for (j, later) in e.variants.iter().enumerate() {
        for earlier in &e.variants[..j] {
            let message = format!(
                "variants `{}` and `{}` of `{ident}` share an event type name or alias, so decoding \
                 could not tell them apart: rename one with `#[event(name = \"…\")]`",
                earlier.ident, later.ident
            );
            let (a, b) = (earlier.ty, later.ty);
            checks.push(quote_spanned! {later.ty.span()=>
                const _: () = ::core::assert!(
                    !::edupulse_events::__private::intersects(
                        <#a as ::edupulse_events::__private::DomainEvent>::ACCEPTED_TYPES,
                        <#b as ::edupulse_events::__private::DomainEvent>::ACCEPTED_TYPES,
                    ),
                    #message
                );
            });
        }
    }
    checks
}

/// With `context = "…"`, compile-time checks that every variant publishes inside it.
fn context_checks(e: &Enum<'_>) -> Vec<TokenStream> {
    let ident = &e.original.ident;
    let Some(context) = &e.attrs.context else { return Vec::new() };
    let context_value = context.value();
    e.variants
        .iter()
        .map(|v| {
            let ty = v.ty;
            let message = format!(
                "variant `{}` of `{ident}` is published outside the context `{context_value}`: give its \
                 event `#[event(context = \"{context_value}\")]` or a subject that starts with `{context_value}.`",
                v.ident
            );
            quote_spanned! {ty.span()=>
                const _: () = ::core::assert!(
                    ::edupulse_events::__private::all_in_context(
                        <#ty as ::edupulse_events::__private::DomainEvent>::SUBJECTS,
                        #context_value,
                    ),
                    #message
                );
            }
        })
        .collect()
}
