//! HttpRule path templates (`/v1/{name=users/*/todos/*}:cancel`): parsing, matching a request
//! path to captured variables, and the OpenAPI spelling.
//!
//! Grammar (google/api/http.proto):
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```

use std::borrow::Cow;
use std::fmt;

/// One segment of a template, with variables flattened into the segments they span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Must equal this text.
    Literal(String),
    /// Any one segment.
    Single,
    /// Zero or more segments (last only).
    Multi,
}

/// A variable: the field it sets and the range of segments whose text becomes its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Dotted field path in the request message (`todo.name`).
    pub field_path: String,
    /// First segment index.
    pub start: usize,
    /// One past the last segment index.
    pub end: usize,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    /// The segments, variables expanded.
    pub segments: Vec<Segment>,
    /// The variables, in order.
    pub variables: Vec<Variable>,
    /// The custom verb after `:`, if any.
    pub verb: Option<String>,
    source: String,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path template {template:?}: {reason}")]
pub struct TemplateError {
    /// The template.
    pub template: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl PathTemplate {
    /// The template as written in the rule.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Parses `template`.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        Self::parse_parts(template).map_err(|reason| TemplateError {
            template: template.to_owned(),
            reason: reason.to_owned(),
        })
    }

    fn parse_parts(template: &str) -> Result<Self, &'static str> {
        let rest = template.strip_prefix('/').ok_or("must start with /")?;
        // The verb is a `:` after the last `/` that is outside braces.
        let (path, verb) = split_verb(rest);
        if verb.is_some_and(|v| v.is_empty() || v.contains('/')) {
            return Err("empty or malformed verb");
        }
        let (mut segments, mut variables) = (Vec::new(), Vec::new());
        let mut chars = path.chars().peekable();
        let mut current = String::new();
        while let Some(c) = chars.next() {
            match c {
                '/' => segments.push(segment(&std::mem::take(&mut current))?),
                '{' => {
                    if !current.is_empty() {
                        return Err("a variable must be a whole segment");
                    }
                    let inner = braced(&mut chars)?;
                    variables.push(variable(&inner, &mut segments)?);
                    match chars.peek() {
                        None => {}
                        Some('/') => {
                            chars.next();
                            if chars.peek().is_none() {
                                return Err("trailing /");
                            }
                        }
                        Some(_) => return Err("a variable must be a whole segment"),
                    }
                }
                '}' => return Err("unbalanced }"),
                c => current.push(c),
            }
        }
        if !current.is_empty() || !path.ends_with('}') {
            segments.push(segment(&current)?);
        }
        if let Some(at) = segments.iter().position(|s| *s == Segment::Multi)
            && at + 1 != segments.len()
        {
            return Err("** must be the last segment");
        }
        Ok(Self {
            segments,
            variables,
            verb: verb.map(str::to_owned),
            source: template.to_owned(),
        })
    }

    /// The variables' values if `path` (the request path, still percent-encoded) matches.
    /// Single-segment values are percent-decoded; multi-segment ones keep their `/`.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        self.matches_split(&SplitPath::new(path)?)
    }

    /// [`Self::matches`] of a path split once for every template it is tried against.
    pub fn matches_split(&self, path: &SplitPath<'_>) -> Option<Vec<(String, String)>> {
        let parts = self.fits(path)?;
        Some(
            self.values(parts)
                .into_iter()
                .map(|(field, value)| (field.to_owned(), value))
                .collect(),
        )
    }

    /// The segments of `path` this template's variables take their values from, if it matches
    /// (every variable's text decodes to UTF-8): the check alone, allocating nothing, so that a
    /// router tries every template and builds the values of one.
    pub fn fits<'p>(&self, path: &'p SplitPath<'_>) -> Option<&'p [Part<'p>]> {
        // The verb follows the last literal `:` (an escaped one is part of a segment, as in
        // grpc-gateway); like literal segments, it is compared percent-decoded.
        let parts: &'p [Part<'p>] = match &self.verb {
            Some(verb) => {
                let (decoded, parts) = path.verb.as_ref()?;
                if decoded.as_deref()? != verb.as_str() {
                    return None;
                }
                parts
            }
            None => &path.parts,
        };
        let multi = self.segments.last() == Some(&Segment::Multi);
        let fixed = self.segments.len() - usize::from(multi);
        if parts.len() < fixed || (!multi && parts.len() != fixed) {
            return None;
        }
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(literal) if part.decoded.as_deref()? != literal.as_str() => {
                    return None;
                }
                Segment::Single if part.raw.is_empty() => return None,
                Segment::Multi => break,
                _ => {}
            }
        }
        // Without a verb in the template, a `:` in the last segment belongs to it literally;
        // but a template without a verb must not swallow another rule's verb.
        if self.verb.is_none() && parts.last().is_some_and(|p| p.raw.contains(':')) && !multi {
            let last = self.segments.last()?;
            if !matches!(last, Segment::Literal(l) if l.contains(':')) {
                return None;
            }
        }
        // A value decodes as a whole exactly when each of its `/`-separated pieces does (`/`
        // is never inside a multi-byte character), so the values below cannot fail.
        for variable in &self.variables {
            let spanned = parts.get(self.span(variable, parts.len()))?;
            if spanned.iter().any(|p| p.decoded.is_none()) {
                return None;
            }
        }
        Some(parts)
    }

    /// The variables' values in `parts` (which [`Self::fits`] accepted), by field path.
    pub fn values(&self, parts: &[Part<'_>]) -> Vec<(&str, String)> {
        let mut values = Vec::with_capacity(self.variables.len());
        for variable in &self.variables {
            let spanned = parts
                .get(self.span(variable, parts.len()))
                .unwrap_or_default();
            let value = if spanned.len() == 1 && self.segments[variable.start] != Segment::Multi {
                spanned[0].decoded.as_deref().unwrap_or_default().to_owned()
            } else {
                let mut value =
                    String::with_capacity(spanned.iter().map(|p| p.raw.len() + 1).sum());
                for (i, part) in spanned.iter().enumerate() {
                    if i > 0 {
                        value.push('/');
                    }
                    decode_keep_slash(part.raw, &mut value);
                }
                value
            };
            values.push((variable.field_path.as_str(), value));
        }
        values
    }

    /// The range of `parts` (of a path with `parts` segments) `variable` spans.
    fn span(&self, variable: &Variable, parts: usize) -> std::ops::Range<usize> {
        let multi = self.segments.last() == Some(&Segment::Multi);
        let end = if variable.end == self.segments.len() && multi {
            parts
        } else {
            variable.end
        };
        variable.start..end
    }

    /// How many literal segments constrain this template: the more, the more specific.
    pub fn specificity(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// Whether two templates match exactly the same paths (an ambiguity).
    pub fn same_shape(&self, other: &PathTemplate) -> bool {
        self.segments == other.segments && self.verb == other.verb
    }

    /// The OpenAPI path and, for each variable, the parameters it became: every `*` becomes a
    /// `{param}` named after the collection before it (`users/*` → `{user}`), `**` a `{path}`.
    pub fn openapi(&self) -> (String, Vec<OpenApiParam>) {
        let mut path = String::new();
        let mut params = Vec::new();
        for (i, segment) in self.segments.iter().enumerate() {
            path.push('/');
            let variable = self
                .variables
                .iter()
                .find(|v| (v.start..v.end).contains(&i));
            match segment {
                Segment::Literal(literal) => path.push_str(literal),
                Segment::Single | Segment::Multi => {
                    let base = match (i.checked_sub(1).map(|p| &self.segments[p]), segment) {
                        (_, Segment::Multi) => "path".to_owned(),
                        (Some(Segment::Literal(collection)), _) => singular(collection),
                        _ => {
                            variable.map_or("param".to_owned(), |v| v.field_path.replace('.', "_"))
                        }
                    };
                    let mut name = base.clone();
                    let mut n = 2;
                    while params.iter().any(|p: &OpenApiParam| p.name == name) {
                        name = format!("{base}{n}");
                        n += 1;
                    }
                    path.push('{');
                    path.push_str(&name);
                    path.push('}');
                    params.push(OpenApiParam {
                        name,
                        field_path: variable.map(|v| v.field_path.clone()),
                        segment: variable.map_or(0, |v| i - v.start),
                    });
                }
            }
        }
        if let Some(verb) = &self.verb {
            path.push(':');
            path.push_str(verb);
        }
        (path, params)
    }
}

/// A path parameter of the OpenAPI spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenApiParam {
    /// The `{name}` in the OpenAPI path.
    pub name: String,
    /// The request field the segment belongs to.
    pub field_path: Option<String>,
    /// Which `/`-separated segment of that field's value it is.
    pub segment: usize,
}

fn singular(collection: &str) -> String {
    collection
        .strip_suffix('s')
        .unwrap_or(collection)
        .to_owned()
}

/// One segment of a template: `*`, `**` or a literal.
fn segment(text: &str) -> Result<Segment, &'static str> {
    Ok(match text {
        "" => return Err("empty segment"),
        "*" => Segment::Single,
        "**" => Segment::Multi,
        literal if literal.contains(['*', '{', '}', '=']) => return Err("bad literal"),
        literal => Segment::Literal(literal.to_owned()),
    })
}

/// What a variable's braces hold, the `{` already read.
fn braced(chars: &mut impl Iterator<Item = char>) -> Result<String, &'static str> {
    let mut inner = String::new();
    for c in chars {
        match c {
            '}' => return Ok(inner),
            '{' => return Err("nested variable"),
            c => inner.push(c),
        }
    }
    Err("unclosed variable")
}

/// The variable `field.path=sub/template` (or `field.path`, which is `*`), its segments added
/// to `segments`.
fn variable(inner: &str, segments: &mut Vec<Segment>) -> Result<Variable, &'static str> {
    let (field_path, sub) = inner.split_once('=').unwrap_or((inner, "*"));
    let valid_path = !field_path.is_empty()
        && field_path
            .split('.')
            .all(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if !valid_path {
        return Err("bad field path");
    }
    let start = segments.len();
    for part in sub.split('/') {
        segments.push(segment(part)?);
    }
    Ok(Variable {
        field_path: field_path.to_owned(),
        start,
        end: segments.len(),
    })
}

fn split_verb(path: &str) -> (&str, Option<&str>) {
    let mut depth = 0usize;
    let mut last_slash = 0;
    let mut colon = None;
    for (i, c) in path.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            '/' if depth == 0 => {
                last_slash = i;
                colon = None;
            }
            ':' if depth == 0 && i >= last_slash => colon = Some(i),
            _ => {}
        }
    }
    match colon {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    }
}

/// A request path split into segments and percent-decoded once, for every template it is
/// tried against.
#[derive(Debug)]
pub struct SplitPath<'a> {
    /// The segments after the leading `/` (none for `/`).
    parts: Vec<Part<'a>>,
    /// When the last `:` is in the last segment: the verb after it (decoded) and the segments
    /// before it.
    verb: Option<(Option<Cow<'a, str>>, Vec<Part<'a>>)>,
}

/// One segment of a request path.
#[derive(Debug, Clone)]
pub struct Part<'a> {
    raw: &'a str,
    /// `None` when it does not decode to UTF-8.
    decoded: Option<Cow<'a, str>>,
}

impl<'a> Part<'a> {
    fn new(raw: &'a str) -> Self {
        Self {
            raw,
            decoded: decode(raw),
        }
    }
}

impl<'a> SplitPath<'a> {
    /// `path` split; `None` if it does not start with `/`.
    pub fn new(path: &'a str) -> Option<Self> {
        let rest = path.strip_prefix('/')?;
        let split = |rest: &'a str| -> Vec<Part<'a>> {
            if rest.is_empty() {
                Vec::new()
            } else {
                rest.split('/').map(Part::new).collect()
            }
        };
        let verb = rest
            .rsplit_once(':')
            .filter(|(_, raw)| !raw.contains('/'))
            .map(|(head, raw)| (decode(raw), split(head)));
        Some(Self {
            parts: split(rest),
            verb,
        })
    }
}

/// `segment` percent-decoded, borrowed when there was nothing to decode; `None` if not UTF-8.
fn decode(segment: &str) -> Option<Cow<'_, str>> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
}

/// Appends `segment` to `out` decoded, all but `%2F`, which stays encoded inside multi-segment
/// values; the segment is known to decode.
fn decode_keep_slash(segment: &str, out: &mut String) {
    let mut first = true;
    for piece in segment.split("%2F").flat_map(|p| p.split("%2f")) {
        if !first {
            out.push_str("%2F");
        }
        first = false;
        out.push_str(&decode(piece).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(t).unwrap().matches(path)
    }

    #[test]
    fn literals_and_verbs() {
        assert_eq!(vars("/v1/auth:login", "/v1/auth:login"), Some(vec![]));
        assert_eq!(vars("/v1/auth:login", "/v1/auth:register"), None);
        assert_eq!(vars("/v1/auth:login", "/v1/auth"), None);
        assert_eq!(vars("/v1/users", "/v1/users"), Some(vec![]));
        assert_eq!(
            vars("/.well-known/jwks.json", "/.well-known/jwks.json"),
            Some(vec![])
        );
    }

    #[test]
    fn variables_with_nested_field_paths() {
        assert_eq!(
            vars("/v1/{todo.name=users/*/todos/*}", "/v1/users/me/todos/42"),
            Some(vec![("todo.name".into(), "users/me/todos/42".into())])
        );
        assert_eq!(
            vars("/v1/{todo.name=users/*/todos/*}", "/v1/users/me/notes/42"),
            None
        );
        assert_eq!(
            vars("/v1/{parent=users/*}/todos", "/v1/users/me/todos"),
            Some(vec![("parent".into(), "users/me".into())])
        );
        assert_eq!(
            vars("/v1/{id}", "/v1/a%20b"),
            Some(vec![("id".into(), "a b".into())])
        );
        assert_eq!(vars("/v1/{id}", "/v1/"), None);
    }

    #[test]
    fn verbs_after_variables() {
        let t = "/v1/{name=users/*/orders/*}:cancel";
        assert_eq!(
            vars(t, "/v1/users/u/orders/o:cancel"),
            Some(vec![("name".into(), "users/u/orders/o".into())])
        );
        assert_eq!(vars(t, "/v1/users/u/orders/o"), None);
        assert_eq!(
            vars("/v1/{name=users/*/orders/*}", "/v1/users/u/orders/o:cancel"),
            None,
            "a verb is not an id"
        );
        assert_eq!(
            vars(
                "/v1/{name=users/*/wallet}:topUp",
                "/v1/users/me/wallet:topUp"
            ),
            Some(vec![("name".into(), "users/me/wallet".into())])
        );
    }

    #[test]
    fn double_wildcards_take_the_rest() {
        assert_eq!(
            vars("/v1/{path=files/**}", "/v1/files/a/b/c"),
            Some(vec![("path".into(), "files/a/b/c".into())])
        );
        assert_eq!(
            vars("/v1/{path=files/**}", "/v1/files"),
            Some(vec![("path".into(), "files".into())])
        );
        assert_eq!(vars("/v1/**", "/v1/x/y"), Some(vec![]));
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in [
            "v1/x",
            "/v1/{",
            "/v1/{a=**}/b",
            "/v1/x{a}",
            "/v1/{a}x",
            "/v1//x",
            "/v1/{a.}",
            "/v1/x:",
            "/v1/{a{b}}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn openapi_spelling() {
        let (path, params) = PathTemplate::parse("/v1/{name=users/*/todos/*}")
            .unwrap()
            .openapi();
        assert_eq!(path, "/v1/users/{user}/todos/{todo}");
        assert_eq!(
            params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            vec!["user", "todo"]
        );
        let (path, _) = PathTemplate::parse("/v1/{name=users/*/wallet}:topUp")
            .unwrap()
            .openapi();
        assert_eq!(path, "/v1/users/{user}/wallet:topUp");
    }

    fn literal() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9.-]{0,6}"
    }

    fn segment_value() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,8}"
    }

    proptest! {
        /// A path built from a template by filling its wildcards matches that template, and
        /// gives back exactly the values that were filled in.
        #[test]
        fn generated_paths_match_their_template(
            prefix in prop::collection::vec(literal(), 0..3),
            collections in prop::collection::vec(literal(), 1..3),
            ids in prop::collection::vec(segment_value(), 3),
            suffix in prop::option::of(literal()),
            verb in prop::option::of("[a-zA-Z]{1,8}"),
        ) {
            let pattern: Vec<String> = collections.iter().map(|c| format!("{c}/*")).collect();
            let mut template = format!("/{}", prefix.iter().map(|p| format!("{p}/")).collect::<String>());
            template.push_str(&format!("{{name={}}}", pattern.join("/")));
            if let Some(s) = &suffix { template.push_str(&format!("/{s}")); }
            if let Some(v) = &verb { template.push_str(&format!(":{v}")); }
            let value: Vec<String> = collections.iter().zip(&ids).map(|(c, id)| format!("{c}/{id}")).collect();
            let value = value.join("/");
            let mut path = format!("/{}{value}", prefix.iter().map(|p| format!("{p}/")).collect::<String>());
            if let Some(s) = &suffix { path.push_str(&format!("/{s}")); }
            if let Some(v) = &verb { path.push_str(&format!(":{v}")); }
            let parsed = PathTemplate::parse(&template).unwrap();
            prop_assert_eq!(parsed.matches(&path), Some(vec![("name".to_owned(), value)]));
        }

        /// Changing one literal segment of a matching path makes it stop matching.
        #[test]
        fn a_changed_literal_does_not_match(
            collection in literal(), id in segment_value(), other in literal(),
        ) {
            prop_assume!(other != collection);
            let parsed = PathTemplate::parse(&format!("/v1/{{name={collection}/*}}")).unwrap();
            let matching = format!("/v1/{collection}/{id}");
            let changed = format!("/v1/{other}/{id}");
            prop_assert!(parsed.matches(&matching).is_some());
            prop_assert!(parsed.matches(&changed).is_none());
        }
    }
}
