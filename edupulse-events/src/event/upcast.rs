//! Raw JSON upcasters: the steps `#[event(upcast(from = N, with = path))]` runs.
//!
//! A raw step turns the JSON payload of version `N` into the JSON payload of version `N + 1`.
//! It is a plain function, pure and deterministic (no I/O, no clock), with one of these
//! signatures:
//!
//! ```text
//! fn(JsonValue) -> JsonValue
//! fn(JsonValue) -> Result<JsonValue, UpcastError>
//! ```
//!
//! The helpers below cover the common steps (rename, default, remove) and report a payload
//! of the wrong shape as an [`UpcastError`] rather than panicking.

use serde_json::{Map, Value};

/// A JSON value, as raw upcasters receive and return it.
pub type JsonValue = Value;

/// An upcaster refused a payload: it does not have the shape that version had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UpcastError(String);

impl UpcastError {
    /// An error with a message that says what was wrong with the payload.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// The result of a raw upcaster: a value, or a value or an error.
pub trait UpcastOutput {
    /// Converts into the common form.
    ///
    /// # Errors
    /// The upcaster's own error.
    fn into_result(self) -> Result<JsonValue, UpcastError>;
}

impl UpcastOutput for JsonValue {
    fn into_result(self) -> Result<JsonValue, UpcastError> {
        Ok(self)
    }
}

impl UpcastOutput for Result<JsonValue, UpcastError> {
    fn into_result(self) -> Result<JsonValue, UpcastError> {
        self
    }
}

/// The payload as a JSON object, or an error saying it is not one.
///
/// # Errors
/// [`UpcastError`] when the payload is not an object.
pub fn object_mut(payload: &mut JsonValue) -> Result<&mut Map<String, JsonValue>, UpcastError> {
    payload.as_object_mut().ok_or_else(|| UpcastError::new("the payload is not a JSON object"))
}

/// Renames field `from` to `to`. A missing `from` is left alone (the field may be optional).
///
/// # Errors
/// [`UpcastError`] when the payload is not an object or already has a field `to`.
#[inline]
pub fn rename_field(mut payload: JsonValue, from: &str, to: &str) -> Result<JsonValue, UpcastError> {
    let object = object_mut(&mut payload)?;
    if let Some(value) = object.remove(from)
        && object.insert(to.to_owned(), value).is_some()
    {
        // The payload is refused as a whole, so the overwritten value does not matter.
        return Err(UpcastError::new(format!("cannot rename `{from}` to `{to}`: `{to}` exists")));
    }
    Ok(payload)
}

/// Adds field `name` with `value` when it is missing.
///
/// # Errors
/// [`UpcastError`] when the payload is not an object.
#[inline]
pub fn default_field(
    mut payload: JsonValue,
    name: &str,
    value: impl Into<JsonValue>,
) -> Result<JsonValue, UpcastError> {
    object_mut(&mut payload)?.entry(name).or_insert_with(|| value.into());
    Ok(payload)
}

/// Removes field `name`, returning the payload and the removed value.
///
/// # Errors
/// [`UpcastError`] when the payload is not an object.
pub fn take_field(mut payload: JsonValue, name: &str) -> Result<(JsonValue, Option<JsonValue>), UpcastError> {
    let taken = object_mut(&mut payload)?.remove(name);
    Ok((payload, taken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rename_default_take() -> Result<(), UpcastError> {
        let v = rename_field(json!({"a": 1}), "a", "b")?;
        assert_eq!(v, json!({"b": 1}));
        let v = default_field(v, "c", "x")?;
        assert_eq!(v, json!({"b": 1, "c": "x"}));
        let (v, taken) = take_field(v, "b")?;
        assert_eq!((v, taken), (json!({"c": "x"}), Some(json!(1))));
        Ok(())
    }

    #[test]
    fn wrong_shapes_are_errors() {
        assert!(rename_field(json!([1]), "a", "b").is_err());
        assert!(rename_field(json!({"a": 1, "b": 2}), "a", "b").is_err());
        assert!(default_field(json!("s"), "a", 1).is_err());
    }
}
