//! `with_*` setters for the settings structs: they are `#[non_exhaustive]`, so code outside
//! the crate starts from `Default` (or a constructor) and sets what it needs. Values are
//! checked where the settings are used, and an invalid one is an error there, never
//! silently replaced.

/// Generates `pub fn with_<field>(self, value) -> Self` for each listed field.
macro_rules! setters {
    ($type:ty { $($setter:ident => $field:ident: $value:ty),* $(,)? }) => {
        impl $type {
            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
                #[must_use]
                pub fn $setter(mut self, value: $value) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}
