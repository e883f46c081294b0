//! NATS subjects: the checks every subject and every run-time token passes.
//!
//! A subject is a dot-separated list of tokens. We accept a token when it is non-empty and
//! made of printable ASCII other than the wildcards `*` and `>`: no whitespace, no control
//! characters, no non-ASCII. Subjects of event types are checked at compile time by the
//! derive; values that reach a subject at run time (an aggregate id, a tenant) go through
//! [`validate_subject_token`], so user data can never widen a subscription or publish to a
//! subject nobody expects.

use crate::EventError;

/// The longest subject accepted: well inside the 4 KiB control line of a NATS server's
/// default `max_control_line`, which also carries the reply subject and the sizes.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// Why a subject or token is refused, or `None` when it is valid.
///
/// `const` so that the derive can check subjects assembled from other types' constants at
/// compile time.
#[doc(hidden)]
pub const fn subject_problem(subject: &str, single_token: bool) -> Option<&'static str> {
    let bytes = subject.as_bytes();
    if bytes.is_empty() {
        return Some("a subject must not be empty");
    }
    if bytes.len() > MAX_SUBJECT_LEN {
        return Some(
            "a subject must not be longer than 1024 bytes (the server's control line also holds the reply subject)",
        );
    }
    if !single_token && bytes[0] == b'$' {
        return Some("subjects starting with `$` are the server's own ($JS, $KV, $SYS, …)");
    }
    let mut i = 0;
    let mut token_len = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'.' {
            if single_token {
                return Some("a subject token must not contain `.`");
            }
            if token_len == 0 {
                return Some("a subject must not contain an empty token (`..`, or `.` at either end)");
            }
            token_len = 0;
        } else if b == b'*' || b == b'>' {
            return Some("the wildcards `*` and `>` are not allowed in a published subject");
        } else if b <= b' ' || b == 0x7f {
            return Some("whitespace and control characters are not allowed in a subject");
        } else if b > 0x7f {
            return Some("only ASCII characters are allowed in a subject");
        } else {
            token_len += 1;
        }
        i += 1;
    }
    if token_len == 0 {
        return Some("a subject must not contain an empty token (`..`, or `.` at either end)");
    }
    None
}

/// Checks a complete subject such as `edupulse.courses.lesson-published`.
///
/// # Errors
/// [`EventError::InvalidSubject`] for an empty subject or token, whitespace, control or
/// non-ASCII characters, or the wildcards `*` and `>`.
pub fn validate_subject(subject: &str) -> Result<(), EventError> {
    match subject_problem(subject, false) {
        None => Ok(()),
        Some(reason) => Err(EventError::InvalidSubject { subject: subject.to_owned(), reason }),
    }
}

/// Checks one token that is about to be put into a subject at run time, such as a tenant
/// name or an aggregate id. Unlike [`validate_subject`] it also refuses `.`.
///
/// # Errors
/// [`EventError::InvalidSubject`] for anything that is not exactly one valid token.
pub fn validate_subject_token(token: &str) -> Result<(), EventError> {
    match subject_problem(token, true) {
        None => Ok(()),
        Some(reason) => Err(EventError::InvalidSubject { subject: token.to_owned(), reason }),
    }
}

/// Whether every subject in `subjects` is `context` followed by at least one more token.
#[doc(hidden)]
pub const fn all_in_context(subjects: &[&str], context: &str) -> bool {
    let mut i = 0;
    while i < subjects.len() {
        let s = subjects[i].as_bytes();
        let c = context.as_bytes();
        if s.len() <= c.len() + 1 || s[c.len()] != b'.' {
            return false;
        }
        let mut j = 0;
        while j < c.len() {
            if s[j] != c[j] {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

/// A subscription filter: tokens are non-empty; `*` stands alone; `>` stands alone, last.
/// Whether NATS subject filter `filter`, split into its tokens, captures `subject`: `*`
/// matches one token, a last `>` one or more.
pub(crate) fn filter_matches(filter: &[impl AsRef<str>], subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for (i, f) in filter.iter().map(AsRef::as_ref).enumerate() {
        if f == ">" {
            return i + 1 == filter.len() && tokens.next().is_some();
        }
        match tokens.next() {
            Some(t) if f == "*" || f == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

pub(crate) fn validate_filter(filter: &str) -> Result<(), EventError> {
    let tokens: Vec<&str> = filter.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let wildcard = *token == "*" || (*token == ">" && i + 1 == tokens.len());
        if !wildcard {
            validate_subject_token(token)
                .map_err(|e| EventError::Config(format!("invalid subject filter {filter:?}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in ["courses.>", "*.courses.*", "a", "a.b.c"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", "a.>.b", "a b", "a.b*", "a.>x"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn accepts_ordinary_subjects() {
        for s in ["a", "edupulse.courses.lesson-published", "Courses.LessonPublished", "a_b.c-d.9"] {
            assert!(validate_subject(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn refuses_bad_subjects() {
        let long = "a.".repeat(512) + "b";
        for s in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a.*",
            "a.>",
            "a b",
            "a\tb",
            "a\nb",
            "é",
            "a\u{7f}",
            "$JS.API.x",
            "$SYS",
            "$KV.b.k",
            &long,
        ] {
            let err = validate_subject(s).expect_err(s);
            assert!(matches!(err, EventError::InvalidSubject { .. }), "{s}: {err}");
        }
    }

    #[test]
    fn tokens_refuse_dots() {
        assert!(validate_subject_token("tenant-1").is_ok());
        assert!(validate_subject_token("tenant.1").is_err());
        assert!(validate_subject_token("").is_err());
        assert!(validate_subject_token(">").is_err());
        // A token becomes a prefix: the whole subject is checked for `$` then.
        assert!(validate_subject("$JS.courses.x").is_err());
        assert!(validate_subject("tenant.$x").is_ok());
    }

    #[test]
    fn context_prefix() {
        assert!(all_in_context(&["courses.A", "courses.b.c"], "courses"));
        assert!(!all_in_context(&["courses"], "courses"));
        assert!(!all_in_context(&["coursesx.A"], "courses"));
        assert!(!all_in_context(&["billing.A"], "courses"));
        assert!(all_in_context(&[], "courses"));
    }
}
