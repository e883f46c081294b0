//! The checks that need more than one token: names, subjects, the upcaster chain, the
//! fields as a whole, the variants as a whole. Each error points at the token to change.

use std::collections::BTreeMap;

use quote::ToTokens;
use syn::{Ident, Type};

use crate::ast::{Enum, Field, Input, Struct};
use crate::attr::{Container, Int, Upcast};
use crate::ctxt::Ctxt;

/// Checks a model; the errors go to `cx`.
pub(crate) fn validate(cx: &Ctxt, input: &Input<'_>) {
    match input {
        Input::Struct(s) => validate_struct(cx, s),
        Input::Enum(e) => validate_enum(cx, e),
    }
}

fn no_generics(cx: &Ctxt, input: &syn::DeriveInput) {
    if !input.generics.params.is_empty() || input.generics.where_clause.is_some() {
        cx.error_spanned_by(
            &input.generics,
            "an event type cannot be generic: its event type name, subject and stored shape \
             must be fixed; write one concrete type per event",
        );
    }
}

/// Checks an event struct: its names, subject, version and upcaster chain, and fields.
fn validate_struct(cx: &Ctxt, s: &Struct<'_>) {
    no_generics(cx, s.original);
    validate_names(cx, s);
    validate_subject(cx, &s.attrs);
    validate_version(cx, &s.attrs);
    validate_chain(cx, s);
    validate_fields(cx, s);
    validate_unique_keys(cx, s);
}

/// Errors for an invalid event type name or alias, and for an alias given twice.
fn validate_names(cx: &Ctxt, s: &Struct<'_>) {
    let event_type = s.event_type();
    match &s.attrs.name {
        Some(lit) => check_name(cx, lit, &event_type, "event type name"),
        None => check_name(cx, &s.original.ident, &event_type, "event type name (the struct's name)"),
    }
    let mut seen = BTreeMap::new();
    seen.insert(event_type, ());
    for alias in &s.attrs.aliases {
        let value = alias.value();
        check_name(cx, alias, &value, "alias");
        if seen.insert(value.clone(), ()).is_some() {
            cx.error_spanned_by(
                alias,
                format!("`{value}` is already the event type name or an alias: remove it"),
            );
        }
    }
}

/// Errors for `subject` together with `context`, and for an invalid subject or context.
fn validate_subject(cx: &Ctxt, attrs: &Container) {
    if let (Some(_), Some(context)) = (&attrs.subject, &attrs.context) {
        cx.error_spanned_by(
            context,
            "give either `subject` (the whole subject) or `context` (a prefix for the name), not both",
        );
    }
    if let Some(subject) = &attrs.subject {
        check_subject(cx, subject, &subject.value(), "subject");
    }
    if let Some(context) = &attrs.context {
        check_subject(cx, context, &context.value(), "context");
    }
}

/// The error for `version = 0`.
fn validate_version(cx: &Ctxt, attrs: &Container) {
    if let Some(v) = &attrs.version
        && v.value == 0
    {
        cx.error_spanned_by(&v.lit, "schema versions start at 1: write `version = 1` or leave it out");
    }
}

/// Errors for a second `aggregate_id` field, for one beside `no_aggregate_id`, and for
/// invalid key names, field by field.
fn validate_fields(cx: &Ctxt, s: &Struct<'_>) {
    let mut aggregate: Option<String> = None;
    for field in &s.fields {
        check_aggregate_id(cx, field, &mut aggregate);
        check_key_name(cx, field);
    }
    if let (Some(keyword), Some(field)) = (&s.attrs.no_aggregate_id, aggregate) {
        cx.error_spanned_by(
            keyword,
            format!(
                "`no_aggregate_id` says the event does not carry its aggregate's id, but `{field}` is \
                 marked `#[event(aggregate_id)]`: keep one of them"
            ),
        );
    }
}

/// The error for an `aggregate_id` field after the first one, whose name `first` remembers.
fn check_aggregate_id(cx: &Ctxt, field: &Field<'_>, first: &mut Option<String>) {
    let Some(keyword) = &field.attrs.aggregate_id else { return };
    match first {
        Some(first) => cx.error_spanned_by(
            keyword,
            format!("only one field can be the aggregate id, and `{first}` already is"),
        ),
        None => *first = Some(field.name()),
    }
}

/// The error for a `key = "…"` rename that is not a valid key name.
fn check_key_name(cx: &Ctxt, field: &Field<'_>) {
    let Some(rename) = field.attrs.key.as_ref().and_then(|k| k.rename.as_ref()) else { return };
    let name = rename.value();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        cx.error_spanned_by(
            rename,
            "a key name is made of ASCII letters, digits and `_`, such as `author_id`",
        );
    }
}

/// Errors for a key name promoted from more than one field, on each later one.
fn validate_unique_keys(cx: &Ctxt, s: &Struct<'_>) {
    let mut keys = BTreeMap::new();
    for (name, field, key) in s.keys() {
        if let Some(first) = keys.insert(name.clone(), field.name()) {
            let at =
                key.rename.as_ref().map_or_else(|| key.keyword.to_token_stream(), ToTokens::to_token_stream);
            cx.error_spanned_by(
                at,
                format!(
                    "the key `{name}` is already promoted from field `{first}`: give one of them \
                     another name with `#[event(key = \"…\")]`"
                ),
            );
        }
    }
}

/// Checks the upcaster chain: `previous`, or one `upcast` step from each older version.
fn validate_chain(cx: &Ctxt, s: &Struct<'_>) {
    let attrs = &s.attrs;
    let version = s.version();
    if let Some(previous) = &attrs.previous {
        validate_previous(cx, previous, version, &attrs.upcasts);
        return;
    }
    // A version above 1 can only come from `version = …`, so `v` is there whenever it matters.
    if let Some(v) = &attrs.version
        && v.value > 1
        && attrs.upcasts.is_empty()
    {
        missing_chain(cx, &s.original.ident, v);
        return;
    }
    let covered = validate_steps(cx, &attrs.upcasts, version);
    validate_coverage(cx, attrs, version, &covered);
}

/// Errors for `previous` on version 1, and for `upcast` steps given alongside `previous`.
fn validate_previous(cx: &Ctxt, previous: &Type, version: u32, upcasts: &[Upcast]) {
    if version <= 1 {
        cx.error_spanned_by(
            previous,
            "`previous` names the shape of the version before this one, but this is version 1: \
             add `version = 2` (or higher) to this struct",
        );
    }
    for step in upcasts {
        cx.error_spanned_by(
            &step.keyword,
            "with `previous = …`, older versions are decoded by the previous type's own chain: \
             move this `upcast(...)` to that type",
        );
    }
}

/// The error for a version above 1 that has neither `previous` nor `upcast` steps.
fn missing_chain(cx: &Ctxt, ident: &Ident, v: &Int) {
    let version = v.value;
    cx.error_spanned_by(
        &v.lit,
        format!(
            "version {version} needs an upcaster chain so that payloads of versions 1 to {} can be \
             read: add `previous = {}V{}` (the old shape, with `impl From<…> for {}`) or \
             `upcast(from = 1, with = …)` steps",
            version - 1,
            ident,
            version - 1,
            ident,
        ),
    );
}

/// Errors for steps from version 0, from the current version or later, or from a version
/// that already has a step; returns the versions that have a step.
fn validate_steps(cx: &Ctxt, upcasts: &[Upcast], version: u32) -> BTreeMap<u32, ()> {
    let mut covered = BTreeMap::new();
    for step in upcasts {
        let Some(from) = &step.from else { continue };
        if from.value == 0 {
            cx.error_spanned_by(
                &from.lit,
                "schema versions start at 1: the first step is `upcast(from = 1, …)`",
            );
        } else if from.value >= version {
            cx.error_spanned_by(
                &from.lit,
                format!(
                    "`upcast(from = {})` would produce version {}, but the current version is {version}: \
                     raise `version` or remove this step",
                    from.value,
                    u64::from(from.value) + 1,
                ),
            );
        } else if covered.insert(from.value, ()).is_some() {
            cx.error_spanned_by(
                &from.lit,
                format!("a second upcaster from version {}: each version has exactly one step", from.value),
            );
        }
    }
    covered
}

/// Errors on `version = …` for each older version that no step starts from.
fn validate_coverage(cx: &Ctxt, attrs: &Container, version: u32, covered: &BTreeMap<u32, ()>) {
    // Without `version = …` the version is 1, and there is nothing to cover.
    let Some(v) = &attrs.version else { return };
    if attrs.upcasts.iter().any(|u| u.from.is_none()) {
        return; // the incomplete step was reported already
    }
    for missing in (1..version).filter(|k| !covered.contains_key(k)) {
        cx.error_spanned_by(
            &v.lit,
            format!(
                "missing upcaster from version {missing} to {}: add `upcast(from = {missing}, with = …)`",
                missing + 1
            ),
        );
    }
}

fn validate_enum(cx: &Ctxt, e: &Enum<'_>) {
    no_generics(cx, e.original);
    if let Some(context) = &e.attrs.context {
        check_subject(cx, context, &context.value(), "context");
    }
    let mut types = BTreeMap::new();
    for variant in &e.variants {
        let ty = variant.ty.to_token_stream().to_string();
        if let Some(first) = types.insert(ty, variant.ident.to_string()) {
            cx.error_spanned_by(
                variant.ty,
                format!(
                    "this event type is already wrapped by variant `{first}`: decoding could not tell \
                     the two variants apart; remove one"
                ),
            );
        }
    }
}

/// An event type name or alias: ASCII letters, digits, `_` and `-`; it becomes a subject token.
fn check_name(cx: &Ctxt, at: impl ToTokens, name: &str, what: &str) {
    if name.is_empty() {
        cx.error_spanned_by(at, format!("the {what} must not be empty"));
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        cx.error_spanned_by(
            at,
            format!(
                "the {what} `{name}` may contain only ASCII letters, digits, `_` and `-`, so that it is \
                 a valid subject token and stable across languages"
            ),
        );
    }
}

/// A subject or a context: dot-separated tokens of printable ASCII, no wildcards.
fn check_subject(cx: &Ctxt, at: impl ToTokens, subject: &str, what: &str) {
    let problem = if subject.is_empty() {
        Some("it must not be empty".to_owned())
    } else if subject.split('.').any(str::is_empty) {
        Some("it has an empty token (`..`, or a `.` at either end)".to_owned())
    } else if subject.contains(['*', '>']) {
        Some("the wildcards `*` and `>` are for subscriptions, never for a published subject".to_owned())
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("whitespace and control characters are not allowed".to_owned())
    } else if !subject.is_ascii() {
        Some("only ASCII characters are allowed".to_owned())
    } else {
        None
    };
    if let Some(problem) = problem {
        cx.error_spanned_by(
            at,
            format!(
                "invalid {what} `{subject}`: {problem}; use lowercase-kebab tokens such as `edupulse.courses`"
            ),
        );
    }
}
