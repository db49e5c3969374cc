//! Resource names (AIP-122): matching `collection/{id}/…` patterns and canonical UUID ids.

use uuid::Uuid;

/// The `*` segments of `name` if it matches `pattern` (e.g. `["users", "*", "todos", "*"]`),
/// each non-empty.
pub fn captures<'a>(name: &'a str, pattern: &[&str]) -> Option<Vec<&'a str>> {
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() != pattern.len() {
        return None;
    }
    let mut captured = Vec::new();
    for (part, expected) in parts.iter().zip(pattern) {
        match *expected {
            "*" if !part.is_empty() => captured.push(*part),
            "*" => return None,
            literal if literal == *part => {}
            _ => return None,
        }
    }
    Some(captured)
}

/// A UUID in its canonical lower-case hyphenated form, as keel prints ids.
pub fn canonical_uuid(segment: &str) -> Option<Uuid> {
    Uuid::parse_str(segment)
        .ok()
        .filter(|id| id.hyphenated().to_string() == segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_capture_their_ids() {
        assert_eq!(
            captures("users/a/todos/b", &["users", "*", "todos", "*"]),
            Some(vec!["a", "b"])
        );
        assert_eq!(
            captures("users/a/todos/", &["users", "*", "todos", "*"]),
            None
        );
        assert_eq!(
            captures("users/a/notes/b", &["users", "*", "todos", "*"]),
            None
        );
        assert_eq!(
            captures("users/a/todos/b/c", &["users", "*", "todos", "*"]),
            None
        );
        assert_eq!(captures("products/p", &["products", "*"]), Some(vec!["p"]));
    }

    #[test]
    fn only_canonical_uuids() {
        let id = Uuid::now_v7();
        assert_eq!(canonical_uuid(&id.to_string()), Some(id));
        assert_eq!(canonical_uuid(&id.to_string().to_uppercase()), None);
        assert_eq!(canonical_uuid(&id.simple().to_string()), None);
    }
}
