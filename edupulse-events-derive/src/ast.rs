//! The model of the input: a struct with its fields, or an enum with its variants, each
//! with its parsed attributes.

use syn::{Data, DeriveInput, Fields, Ident, Member, Type};

use crate::attr::{self, Place};
use crate::ctxt::Ctxt;

/// What the derive is applied to.
pub(crate) enum Input<'a> {
    Struct(Struct<'a>),
    Enum(Enum<'a>),
}

/// An event struct.
pub(crate) struct Struct<'a> {
    pub(crate) original: &'a DeriveInput,
    pub(crate) attrs: attr::Container,
    pub(crate) fields: Vec<Field<'a>>,
}

/// A field of an event struct.
pub(crate) struct Field<'a> {
    pub(crate) member: Member,
    pub(crate) ty: &'a Type,
    pub(crate) attrs: attr::Field,
}

/// An enum of events.
pub(crate) struct Enum<'a> {
    pub(crate) original: &'a DeriveInput,
    pub(crate) attrs: attr::Container,
    pub(crate) variants: Vec<Variant<'a>>,
}

/// A variant wrapping one event type: `LessonPublished(LessonPublished)`.
pub(crate) struct Variant<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
}

impl<'a> Input<'a> {
    /// Builds the model. Shapes that no event can have (unions, tuple structs, variants that
    /// do not wrap exactly one event) are recorded as errors and left out of the model.
    pub(crate) fn from_syn(cx: &Ctxt, input: &'a DeriveInput) -> Option<Self> {
        match &input.data {
            Data::Struct(data) => {
                let attrs = attr::container(cx, &input.attrs, Place::Struct);
                let fields = match &data.fields {
                    Fields::Named(named) => named.named.iter().map(|f| Field::from_syn(cx, f)).collect(),
                    Fields::Unit => Vec::new(),
                    Fields::Unnamed(unnamed) => {
                        cx.error_spanned_by(
                            unnamed,
                            "an event struct needs named fields, so that stored payloads stay readable \
                             and can evolve: write `struct Name { field: Type }`",
                        );
                        Vec::new()
                    }
                };
                Some(Input::Struct(Struct { original: input, attrs, fields }))
            }
            Data::Enum(data) => {
                let attrs = attr::container(cx, &input.attrs, Place::Enum);
                let variants = data.variants.iter().filter_map(|v| Variant::from_syn(cx, v)).collect();
                if data.variants.is_empty() {
                    cx.error_spanned_by(
                        &input.ident,
                        "an enum of events needs at least one variant, such as `LessonPublished(LessonPublished)`",
                    );
                }
                Some(Input::Enum(Enum { original: input, attrs, variants }))
            }
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`DomainEvent` cannot be derived for a union: use a struct, or an enum of event structs",
                );
                None
            }
        }
    }
}

impl<'a> Field<'a> {
    fn from_syn(cx: &Ctxt, field: &'a syn::Field) -> Self {
        let member = match &field.ident {
            Some(ident) => Member::Named(ident.clone()),
            None => Member::Unnamed(0.into()),
        };
        let attrs = attr::field(cx, &field.attrs, Place::Field);
        Field { member, ty: &field.ty, attrs }
    }

    /// The field's name as written in JSON and in key names (`r#type` is `type`).
    pub(crate) fn name(&self) -> String {
        match &self.member {
            Member::Named(ident) => {
                let s = ident.to_string();
                s.strip_prefix("r#").map(str::to_owned).unwrap_or(s)
            }
            Member::Unnamed(index) => index.index.to_string(),
        }
    }
}

impl<'a> Variant<'a> {
    fn from_syn(cx: &Ctxt, variant: &'a syn::Variant) -> Option<Self> {
        // `#[event(...)]` on a variant or on its field is refused with a message.
        attr::field(cx, &variant.attrs, Place::Variant);
        if let Some((_, discriminant)) = &variant.discriminant {
            cx.error_spanned_by(discriminant, "a variant of an enum of events cannot have a discriminant");
        }
        match &variant.fields {
            Fields::Unnamed(f) if f.unnamed.len() == 1 => {
                let field = f.unnamed.first()?;
                attr::field(cx, &field.attrs, Place::Variant);
                Some(Variant { ident: &variant.ident, ty: &field.ty })
            }
            _ => {
                let ident = &variant.ident;
                cx.error_spanned_by(
                    variant,
                    format!(
                        "each variant of an enum of events wraps exactly one event type: write \
                         `{ident}({ident})` and derive `DomainEvent` on the struct `{ident}`"
                    ),
                );
                None
            }
        }
    }
}

impl Struct<'_> {
    /// The event type name: `name = "…"` or the struct's name.
    pub(crate) fn event_type(&self) -> String {
        match &self.attrs.name {
            Some(name) => name.value(),
            None => self.original.ident.to_string(),
        }
    }

    /// The current schema version.
    pub(crate) fn version(&self) -> u32 {
        self.attrs.version.as_ref().map_or(1, |v| v.value)
    }

    /// The subject: `subject = "…"`, else `<context>.<name>`, else the name.
    pub(crate) fn subject(&self) -> String {
        match (&self.attrs.subject, &self.attrs.context) {
            (Some(subject), _) => subject.value(),
            (None, Some(context)) => format!("{}.{}", context.value(), self.event_type()),
            (None, None) => self.event_type(),
        }
    }

    /// The aliases, as strings.
    pub(crate) fn aliases(&self) -> Vec<String> {
        self.attrs.aliases.iter().map(syn::LitStr::value).collect()
    }

    /// The field marked `#[event(aggregate_id)]`, if any (the first one).
    pub(crate) fn aggregate_field(&self) -> Option<&Field<'_>> {
        self.fields.iter().find(|f| f.attrs.aggregate_id.is_some())
    }

    /// The promoted key fields with their key names and their `key` attributes.
    pub(crate) fn keys(&self) -> Vec<(String, &Field<'_>, &attr::Key)> {
        self.fields
            .iter()
            .filter_map(|f| {
                let key = f.attrs.key.as_ref()?;
                let name = key.rename.as_ref().map_or_else(|| f.name(), syn::LitStr::value);
                Some((name, f, key))
            })
            .collect()
    }
}
