//! Input rules every service shares: field errors, AIP-155 request ids, money, update masks,
//! e-mail addresses and free-text fields.

use sha2::{Digest as _, Sha256};

use crate::proto::keel::r#type::v1::Money;

/// A malformed request field; services turn it into INVALID_ARGUMENT with a BadRequest naming
/// `field`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    /// The request field, as a dotted path (`todo.title`, `requests[3].job.type`).
    pub field: std::borrow::Cow<'static, str>,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldError {
    /// A malformed `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error, of the field as it sits inside `parent` (`requests[3]`): a batch names
    /// the request that is wrong.
    #[must_use]
    pub fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field).into(),
            reason: self.reason,
        }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        keel_mesh::status::invalid_argument(&e.field, e.reason)
    }
}

/// A `request_id`: empty (none) or a UUID, kept in canonical form.
pub fn request_id(raw: &str) -> Result<Option<String>, FieldError> {
    if raw.is_empty() {
        return Ok(None);
    }
    uuid::Uuid::parse_str(raw)
        .map(|id| Some(id.hyphenated().to_string()))
        .map_err(|_| FieldError::new("request_id", "must be a UUID"))
}

/// An idempotency key (`request_id`, `payment_id`) already used with a different request: a
/// conflict with what the server holds (ALREADY_EXISTS, HTTP 409), not a malformed field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {key} was already used with a different request")]
pub struct Reused {
    /// The key's field.
    pub field: &'static str,
    /// The key.
    pub key: String,
}

impl From<Reused> for tonic::Status {
    fn from(e: Reused) -> Self {
        tonic::Status::already_exists(e.to_string())
    }
}

/// The error for a `request_id` reused with a different request body.
pub fn request_id_reused(request_id: &str) -> Reused {
    Reused {
        field: "request_id",
        key: request_id.to_owned(),
    }
}

/// What an earlier create under the same `request_id` means for this one: `found` (with the
/// fingerprint it stored) is replayed when the fingerprints match, and refused when they differ.
pub fn replay<M>(
    found: Option<M>,
    stored_hash: impl Fn(&M) -> Option<&str>,
    request_id: &str,
    hash: &str,
) -> Result<Option<M>, Reused> {
    match found {
        Some(found) if stored_hash(&found) == Some(hash) => Ok(Some(found)),
        Some(_) => Err(request_id_reused(request_id)),
        None => Ok(None),
    }
}

/// A digest of a request, to tell a retry (same body) from a reuse (another body).
pub fn fingerprint(message: &impl prost::Message) -> String {
    let digest = Sha256::digest(message.encode_to_vec());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A validated amount: ISO 4217 code and minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Amount {
    /// Three upper-case letters.
    pub currency_code: String,
    /// Minor units.
    pub units: i64,
}

/// What amounts a field accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// Zero or more (prices).
    NonNegative,
    /// More than zero (top-ups, charges).
    Positive,
}

/// Checks a Money field: present, a currency code, and units of the right sign.
pub fn money(money: Option<&Money>, field: &'static str, sign: Sign) -> Result<Amount, FieldError> {
    let money = money.ok_or_else(|| FieldError::new(field, "required"))?;
    let code = &money.currency_code;
    if !crate::money::is_currency_code(code) {
        return Err(FieldError::new(
            field,
            "currency_code must be a three-letter ISO 4217 code such as EUR",
        ));
    }
    match sign {
        Sign::NonNegative if money.units < 0 => {
            Err(FieldError::new(field, "units must not be negative"))
        }
        Sign::Positive if money.units <= 0 => Err(FieldError::new(field, "units must be positive")),
        _ => Ok(Amount {
            currency_code: code.clone(),
            units: money.units,
        }),
    }
}

/// A field an update may name in its mask. Services list theirs as an enum and match on it
/// without a catch-all arm, so that a new updatable field without its arm does not compile.
pub trait MaskPath: Copy + 'static {
    /// Every updatable field, with its path as the proto spells it.
    const PATHS: &'static [(&'static str, Self)];
}

/// The fields a required update mask names, each one of `F`'s.
pub fn update_mask<F: MaskPath>(
    mask: Option<&prost_types::FieldMask>,
) -> Result<Vec<F>, FieldError> {
    let mask = mask
        .filter(|m| !m.paths.is_empty())
        .ok_or_else(|| FieldError::new("update_mask", "required: name the fields to update"))?;
    mask.paths
        .iter()
        .map(|path| {
            F::PATHS
                .iter()
                .find(|(name, _)| name == path)
                .map(|(_, field)| *field)
                .ok_or_else(|| {
                    let updatable: Vec<&str> = F::PATHS.iter().map(|(name, _)| *name).collect();
                    FieldError::new(
                        "update_mask",
                        format!(
                            "unknown or immutable field {path:?}; updatable: {}",
                            updatable.join(", ")
                        ),
                    )
                })
        })
        .collect()
}

/// The e-mail in canonical form (trimmed, lower case) if it is one address as RFC 5321 writes
/// it: a dot-atom local part (letters, digits and ``!#$%&'*+/=?^_`{|}~-``, dots only between
/// them) of at most 64 characters, `@`, and a domain of letter-digit-hyphen labels (none
/// starting or ending with a hyphen) with at least one dot. No quoted local parts, comments,
/// lists or display names: exactly what a mailer can send to.
pub fn email(raw: &str, field: &'static str) -> Result<String, FieldError> {
    let email = raw.trim().to_lowercase();
    let invalid = |reason: &str| Err(FieldError::new(field, reason));
    if email.is_empty() {
        return invalid("required");
    }
    if email.len() > 254 {
        return invalid("longer than 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return invalid("must look like name@example.com");
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c);
    let dot_atom = local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if local.len() > 64 || !dot_atom || !domain.contains('.') || !domain.split('.').all(label) {
        return invalid("must be one address, like name@example.com");
    }
    Ok(email)
}

/// Free text: trimmed, within `min..=max` characters, no control characters but newlines and
/// tabs when `multiline`.
pub fn text(
    raw: &str,
    field: &'static str,
    min: usize,
    max: usize,
    multiline: bool,
) -> Result<String, FieldError> {
    let value = raw.trim();
    let chars = value.chars().count();
    if chars < min {
        return Err(FieldError::new(
            field,
            if min == 1 {
                "required".to_owned()
            } else {
                format!("at least {min} characters")
            },
        ));
    }
    if chars > max {
        return Err(FieldError::new(field, format!("at most {max} characters")));
    }
    let allowed = |c: char| !c.is_control() || (multiline && (c == '\n' || c == '\t'));
    if !value.chars().all(allowed) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value.to_owned())
}

impl From<keel_pagetoken::PageError> for FieldError {
    fn from(e: keel_pagetoken::PageError) -> Self {
        let field = match e {
            keel_pagetoken::PageError::InvalidToken => "page_token",
            keel_pagetoken::PageError::NegativePageSize => "page_size",
        };
        FieldError::new(field, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(units: i64) -> Money {
        Money {
            currency_code: "EUR".into(),
            units,
        }
    }

    #[test]
    fn request_ids_are_uuids() {
        assert_eq!(request_id("").unwrap(), None);
        let id = uuid::Uuid::new_v4();
        assert_eq!(
            request_id(&id.to_string().to_uppercase()).unwrap(),
            Some(id.to_string())
        );
        assert_eq!(request_id("abc").unwrap_err().field, "request_id");
    }

    #[test]
    fn money_needs_a_currency_and_the_right_sign() {
        assert!(money(Some(&eur(0)), "price", Sign::NonNegative).is_ok());
        assert!(money(Some(&eur(-1)), "price", Sign::NonNegative).is_err());
        assert!(money(Some(&eur(0)), "amount", Sign::Positive).is_err());
        assert!(money(None, "price", Sign::NonNegative).is_err());
        let no_currency = Money {
            currency_code: String::new(),
            units: 5,
        };
        assert!(money(Some(&no_currency), "price", Sign::NonNegative).is_err());
        let lower = Money {
            currency_code: "eur".into(),
            units: 5,
        };
        assert!(money(Some(&lower), "price", Sign::NonNegative).is_err());
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Field {
        Title,
        Completed,
    }

    impl MaskPath for Field {
        const PATHS: &'static [(&'static str, Self)] =
            &[("title", Self::Title), ("completed", Self::Completed)];
    }

    #[test]
    fn masks_name_known_fields() {
        let mask = |paths: &[&str]| prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        };
        assert_eq!(
            update_mask::<Field>(Some(&mask(&["completed", "title"]))).unwrap(),
            vec![Field::Completed, Field::Title]
        );
        let bad = update_mask::<Field>(Some(&mask(&["title", "owner"]))).unwrap_err();
        assert_eq!(bad.field, "update_mask");
        assert!(bad.reason.contains("\"owner\""), "{bad}");
        assert!(update_mask::<Field>(None).is_err());
        assert!(update_mask::<Field>(Some(&mask(&[]))).is_err());
    }

    #[test]
    fn text_is_trimmed_and_bounded() {
        assert_eq!(text(" hi ", "title", 1, 5, false).unwrap(), "hi");
        assert!(text("   ", "title", 1, 5, false).is_err());
        assert!(text("toolong", "title", 1, 5, false).is_err());
        assert!(text("a\nb", "title", 1, 5, false).is_err());
        assert!(text("a\nb", "description", 0, 5, true).is_ok());
    }
}
