//! What identity accepts: e-mail shape, password length, display names.

use crate::input::FieldError;

/// Shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted, in characters (argon2 cost grows with input).
pub const MAX_PASSWORD_CHARS: usize = 128;
/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;

/// The e-mail in canonical form (trimmed, lower case) if it looks like `local@domain.tld`.
pub fn email(raw: &str) -> Result<String, FieldError> {
    crate::input::email(raw, "email")
}

/// Checks a new password's length.
pub fn password(password: &str) -> Result<(), FieldError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(FieldError::new(
            "password",
            format!("must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(FieldError::new(
            "password",
            format!("must be at most {MAX_PASSWORD_CHARS} characters"),
        ));
    }
    Ok(())
}

/// The display name trimmed, if it is 1 to 100 characters without control characters.
pub fn display_name(raw: &str) -> Result<String, FieldError> {
    crate::input::text(raw, "display_name", 1, MAX_DISPLAY_NAME_CHARS, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_canonicalised() {
        assert_eq!(email("  Ada@Example.COM ").unwrap(), "ada@example.com");
        assert_eq!(
            email("a.b+c@sub.example.io").unwrap(),
            "a.b+c@sub.example.io"
        );
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@ex..com",
            "a@b@c.io",
            "ada@exa_mple.com",
            // One address as a mailer writes it: no lists, no quoting, no stray dots.
            "a,b@x.org",
            "ada@x.org,bob@y.org",
            "\"ada\"@x.org",
            "<ada@x.org>",
            "ada.@x.org",
            ".ada@x.org",
            "a..da@x.org",
            "ada@-x.org",
            "ada;bob@x.org",
        ] {
            assert!(email(bad).is_err(), "{bad:?}");
        }
        // What the check lets through, the mailer takes.
        for good in ["o'brien@x.org", "a.b+c@sub.example.io", "x_y-z@a-b.io"] {
            let canonical = email(good).unwrap();
            assert!(canonical.parse::<lettre::Address>().is_ok(), "{good:?}");
        }
    }

    #[test]
    fn passwords_need_8_to_128_characters() {
        assert!(password("1234567").is_err());
        assert!(password("12345678").is_ok());
        assert!(password(&"x".repeat(129)).is_err());
        assert!(password("пароль12").is_ok(), "characters, not bytes");
    }

    #[test]
    fn display_names() {
        assert_eq!(display_name(" Ada ").unwrap(), "Ada");
        assert!(display_name("   ").is_err());
        assert!(display_name("a\u{0}b").is_err());
        assert!(display_name(&"x".repeat(101)).is_err());
    }
}
