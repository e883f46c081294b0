//! Reads `#[event(...)]` attributes into plain structs, keeping the tokens for spans.
//!
//! Only syntax is checked here: which keys exist, and that each value has the right kind
//! of token. What the values mean is checked in `valid.rs`.

use proc_macro2::{Ident, TokenTree};
use syn::meta::ParseNestedMeta;
use syn::{Attribute, Lit, LitInt, LitStr, Path, Token, Type};

use crate::ctxt::Ctxt;
use crate::symbol::{
    AGGREGATE_ID, ALIAS, CONTEXT, ENUM_KEYS, EVENT, FIELD_KEYS, FROM, KEY, NAME, NO_AGGREGATE_ID, PREVIOUS,
    STRUCT_KEYS, SUBJECT, UPCAST, UPCAST_KEYS, VERSION, WITH,
};

/// Where an attribute was found: decides which keys are allowed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Struct,
    Enum,
    Field,
    Variant,
}

/// An integer literal with its value.
pub(crate) struct Int {
    pub(crate) lit: LitInt,
    pub(crate) value: u32,
}

/// `upcast(from = K, with = path)`.
pub(crate) struct Upcast {
    /// The `upcast` keyword, for errors about the step as a whole.
    pub(crate) keyword: Ident,
    pub(crate) from: Option<Int>,
    pub(crate) with: Option<Path>,
}

/// The keys of `#[event(...)]` on a struct or an enum.
#[derive(Default)]
pub(crate) struct Container {
    pub(crate) name: Option<LitStr>,
    pub(crate) aliases: Vec<LitStr>,
    pub(crate) version: Option<Int>,
    pub(crate) context: Option<LitStr>,
    pub(crate) subject: Option<LitStr>,
    pub(crate) previous: Option<Type>,
    pub(crate) upcasts: Vec<Upcast>,
    /// `no_aggregate_id`: the event does not carry its aggregate's id (said on purpose).
    pub(crate) no_aggregate_id: Option<Ident>,
}

/// `#[event(key)]` or `#[event(key = "name")]`.
pub(crate) struct Key {
    pub(crate) keyword: Ident,
    pub(crate) rename: Option<LitStr>,
}

/// The keys of `#[event(...)]` on a field.
#[derive(Default)]
pub(crate) struct Field {
    pub(crate) aggregate_id: Option<Ident>,
    pub(crate) key: Option<Key>,
}

/// Reads the container attributes of a struct or enum.
pub(crate) fn container(cx: &Ctxt, attrs: &[Attribute], place: Place) -> Container {
    let mut out = Container::default();
    for attr in event_attrs(attrs) {
        let result = attr.parse_nested_meta(|meta| {
            let Some(key) = key_of(cx, &meta, place)? else {
                return Ok(());
            };
            match key.to_string().as_str() {
                NAME => set_once(cx, &mut out.name, &key, parse_str(cx, &meta)?),
                ALIAS => out.aliases.extend(parse_str(cx, &meta)?),
                VERSION => set_once(cx, &mut out.version, &key, parse_int(cx, &meta)?),
                CONTEXT => set_once(cx, &mut out.context, &key, parse_str(cx, &meta)?),
                SUBJECT => set_once(cx, &mut out.subject, &key, parse_str(cx, &meta)?),
                PREVIOUS => {
                    let ty: Type = meta.value()?.parse()?;
                    set_once(cx, &mut out.previous, &key, Some(ty));
                }
                UPCAST => out.upcasts.push(parse_upcast(cx, &meta, key)?),
                NO_AGGREGATE_ID => {
                    let flag = parse_flag(cx, &meta, &key)?;
                    set_once(cx, &mut out.no_aggregate_id, &key, flag);
                }
                _ => unreachable_key(cx, &key),
            }
            Ok(())
        });
        if let Err(e) = result {
            cx.push(e);
        }
    }
    out
}

/// Reads the attributes of a field (or, to refuse them, of a variant).
pub(crate) fn field(cx: &Ctxt, attrs: &[Attribute], place: Place) -> Field {
    let mut out = Field::default();
    for attr in event_attrs(attrs) {
        let result = attr.parse_nested_meta(|meta| {
            let Some(key) = key_of(cx, &meta, place)? else {
                return Ok(());
            };
            match key.to_string().as_str() {
                AGGREGATE_ID => {
                    let flag = parse_flag(cx, &meta, &key)?;
                    set_once(cx, &mut out.aggregate_id, &key, flag);
                }
                KEY => {
                    let rename = if meta.input.peek(Token![=]) { parse_str(cx, &meta)? } else { None };
                    let new = Key { keyword: key.clone(), rename };
                    set_once(cx, &mut out.key, &key, Some(new));
                }
                _ => unreachable_key(cx, &key),
            }
            Ok(())
        });
        if let Err(e) = result {
            cx.push(e);
        }
    }
    out
}

/// A key that takes no value (`aggregate_id`, `no_aggregate_id`): the key itself, with an
/// error (and the value skipped) when one is given.
fn parse_flag(cx: &Ctxt, meta: &ParseNestedMeta<'_>, key: &Ident) -> syn::Result<Option<Ident>> {
    if meta.input.peek(Token![=]) || meta.input.peek(syn::token::Paren) {
        skip_value(meta)?;
        cx.error_spanned_by(key, format!("`{key}` takes no value: write `#[event({key})]`"));
    }
    Ok(Some(key.clone()))
}

/// The `#[event]` attributes; anything but the list form is an error reported on the spot
/// by `parse_nested_meta`.
fn event_attrs(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|a| a.path().is_ident(EVENT))
}

/// The key of one nested meta item, or `None` (with the error recorded and the value
/// skipped) when the key is not allowed here.
fn key_of(cx: &Ctxt, meta: &ParseNestedMeta<'_>, place: Place) -> syn::Result<Option<Ident>> {
    let Some(key) = meta.path.get_ident().cloned() else {
        skip_value(meta)?;
        cx.error_spanned_by(&meta.path, "expected an event attribute key such as `name`, `version` or `key`");
        return Ok(None);
    };
    let name = key.to_string();
    let allowed = match place {
        Place::Struct => STRUCT_KEYS,
        Place::Enum => ENUM_KEYS,
        Place::Field => FIELD_KEYS,
        Place::Variant => &[],
    };
    if allowed.contains(&name.as_str()) {
        return Ok(Some(key));
    }
    skip_value(meta)?;
    let message = misplaced(&name, place).unwrap_or_else(|| unknown_key(&name, allowed));
    cx.error_spanned_by(&key, message);
    Ok(None)
}

/// The message for a known key used in the wrong place.
fn misplaced(name: &str, place: Place) -> Option<String> {
    let is_struct_key = STRUCT_KEYS.contains(&name);
    let is_field_key = FIELD_KEYS.contains(&name);
    match place {
        Place::Variant if is_struct_key || is_field_key => Some(format!(
            "`{name}` does not go on an enum variant: put it on the event struct the variant wraps"
        )),
        Place::Enum if is_struct_key => Some(format!(
            "`{name}` belongs on the event struct, not on an enum of events: each variant's event \
             carries its own; an enum takes only `context`"
        )),
        Place::Enum if is_field_key => {
            Some(format!("`{name}` is a field attribute: put it on a field of the event struct"))
        }
        Place::Struct if is_field_key => {
            Some(format!("`{name}` is a field attribute: write `#[event({name})]` on the field"))
        }
        Place::Field if is_struct_key => {
            Some(format!("`{name}` is a struct attribute: write `#[event({name} = …)]` above the struct"))
        }
        _ => None,
    }
}

/// The message for a key that exists nowhere, with the closest allowed key if one is close.
fn unknown_key(name: &str, allowed: &[&str]) -> String {
    let closest =
        allowed.iter().map(|k| (edit_distance(name, k), *k)).filter(|(d, k)| *d <= 2.max(k.len() / 3)).min();
    match closest {
        Some((_, k)) => format!("unknown event attribute `{name}`, did you mean `{k}`?"),
        None if allowed.is_empty() => format!("unknown event attribute `{name}`"),
        None => format!("unknown event attribute `{name}`; expected one of: `{}`", allowed.join("`, `")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb { prev } else { 1 + prev.min(row[j]).min(cur) };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Keys are checked against the allow-lists before the match, so this is never reached;
/// it reports an error rather than panicking all the same.
fn unreachable_key(cx: &Ctxt, key: &Ident) {
    cx.error_spanned_by(key, format!("unsupported event attribute `{key}`"));
}

/// Skips `= value` or `(...)` after a refused key, so that parsing can go on.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.input.parse::<Token![=]>()?;
        while !meta.input.is_empty() && !meta.input.peek(Token![,]) {
            meta.input.parse::<TokenTree>()?;
        }
    } else if meta.input.peek(syn::token::Paren) {
        meta.input.parse::<TokenTree>()?;
    }
    Ok(())
}

/// Stores `value` unless the key was already given; a repeat is an error on its key.
fn set_once<T>(cx: &Ctxt, slot: &mut Option<T>, key: &Ident, value: Option<T>) {
    let Some(value) = value else { return };
    if slot.is_some() {
        cx.error_spanned_by(key, format!("duplicate event attribute `{key}`: give it once"));
    } else {
        *slot = Some(value);
    }
}

/// `key = "string"`; another literal is recorded as an error and gives `None`.
fn parse_str(cx: &Ctxt, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<LitStr>> {
    let key = meta.path.get_ident().map(ToString::to_string).unwrap_or_default();
    match meta.value()?.parse::<Lit>()? {
        Lit::Str(s) => Ok(Some(s)),
        other => {
            cx.error_spanned_by(&other, format!("expected a string: `{key} = \"…\"`"));
            Ok(None)
        }
    }
}

/// `key = 123`; another literal, or a number that does not fit in `u32`, is an error.
fn parse_int(cx: &Ctxt, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Int>> {
    let key = meta.path.get_ident().map(ToString::to_string).unwrap_or_default();
    match meta.value()?.parse::<Lit>()? {
        Lit::Int(lit) => match lit.base10_parse::<u32>() {
            Ok(value) => Ok(Some(Int { lit, value })),
            Err(_) => {
                cx.error_spanned_by(&lit, format!("`{key}` must be a whole number from 1 to {}", u32::MAX));
                Ok(None)
            }
        },
        other => {
            cx.error_spanned_by(&other, format!("expected an integer without quotes: `{key} = 2`"));
            Ok(None)
        }
    }
}

/// `upcast(from = K, with = path)`.
fn parse_upcast(cx: &Ctxt, meta: &ParseNestedMeta<'_>, keyword: Ident) -> syn::Result<Upcast> {
    let mut step = Upcast { keyword, from: None, with: None };
    if !meta.input.peek(syn::token::Paren) {
        skip_value(meta)?;
        cx.error_spanned_by(&step.keyword, "expected `upcast(from = 1, with = path::to_fn)`");
        return Ok(step);
    }
    meta.parse_nested_meta(|inner| {
        let Some(key) = inner.path.get_ident().cloned() else {
            skip_value(&inner)?;
            cx.error_spanned_by(&inner.path, "expected `from = …` or `with = …`");
            return Ok(());
        };
        match key.to_string().as_str() {
            FROM => {
                let int = parse_int(cx, &inner)?;
                set_once(cx, &mut step.from, &key, int);
            }
            WITH => {
                let path: Path = inner.value()?.parse()?;
                set_once(cx, &mut step.with, &key, Some(path));
            }
            other => {
                skip_value(&inner)?;
                cx.error_spanned_by(&key, unknown_key(other, UPCAST_KEYS));
            }
        }
        Ok(())
    })?;
    if step.from.is_none() {
        cx.error_spanned_by(
            &step.keyword,
            "`upcast` needs the version it starts from: `upcast(from = 1, with = …)`",
        );
    }
    if step.with.is_none() {
        cx.error_spanned_by(
            &step.keyword,
            "`upcast` needs the function that converts the payload: `upcast(from = 1, with = path::to_fn)`",
        );
    }
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            unknown_key("verison", STRUCT_KEYS),
            "unknown event attribute `verison`, did you mean `version`?"
        );
        assert_eq!(
            unknown_key("aggregateid", FIELD_KEYS),
            "unknown event attribute `aggregateid`, did you mean `aggregate_id`?"
        );
        assert!(unknown_key("zzz", STRUCT_KEYS).contains("expected one of"));
    }
}
