//! The route table: every `google.api.http` rule (and additional binding) of a descriptor pool,
//! checked and precomputed at start-up, then matched per request without walking descriptors.

use std::collections::HashMap;

use http::Method;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    Value,
};
use serde_json::{Map, Value as Json};

use crate::template::{PathTemplate, SplitPath};

/// Where a request body goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyMapping {
    /// No body; everything not in the path comes from the query string.
    None,
    /// `body: "*"`: the body is the whole request message (less path variables).
    All,
    /// `body: "field"`: the body is that top-level field; the rest comes from the query.
    Field(String),
}

/// One HTTP binding of one RPC.
#[derive(Debug, Clone)]
pub struct Route {
    /// GET, POST, ...
    pub http_method: Method,
    /// The path template.
    pub template: PathTemplate,
    /// Where the body goes.
    pub body: BodyMapping,
    /// The response field sent as the body, if not the whole response.
    pub response_body: Option<String>,
    /// The RPC.
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: String,
    /// How a PATCH fills its `update_mask` from its body's keys, if it does.
    pub implied_mask: Option<ImpliedMask>,
    /// The generated JSON of its response message, if the gateway was given one.
    pub render: Option<crate::transcode::Render>,
    /// Builds the request message from its JSON without reflection, where generated code can.
    pub parse: Option<crate::transcode::Parse>,
}

impl Route {
    /// Whether the RPC streams its responses.
    pub fn server_streaming(&self) -> bool {
        self.method.is_server_streaming()
    }
}

/// The `update_mask` a PATCH route fills from the keys of its body when the query does not set
/// it (AIP-134's implied mask, as grpc-gateway does), worked out at start-up.
#[derive(Debug, Clone)]
pub struct ImpliedMask {
    /// The request's `update_mask` field.
    pub field: FieldDescriptor,
    /// The body resource's fields a caller may set (not output only, not the identifier), by
    /// JSON and proto name, each to its JSON name.
    settable: HashMap<String, String>,
}

impl ImpliedMask {
    /// The mask of a PATCH to `method` whose body is `body`, if it has one.
    fn of(http_method: &Method, method: &MethodDescriptor, body: &BodyMapping) -> Option<Self> {
        let BodyMapping::Field(body) = body else {
            return None;
        };
        if http_method != Method::PATCH {
            return None;
        }
        let input = method.input();
        let field = crate::annotations::update_mask_field(&input)?;
        let Kind::Message(resource) = input.get_field_by_name(body)?.kind() else {
            return None;
        };
        let settable = resource
            .fields()
            .filter(|f| !crate::annotations::behavior(f).read_only)
            .flat_map(|f| {
                let json = f.json_name().to_owned();
                [(json.clone(), json.clone()), (f.name().to_owned(), json)]
            })
            .collect();
        Some(Self { field, settable })
    }

    /// The paths a body implies: the settable fields it sends, not `null`, in JSON spelling.
    pub fn paths(&self, sent: &Map<String, Json>) -> Vec<String> {
        sent.iter()
            .filter(|(_, value)| !value.is_null())
            .filter_map(|(key, _)| self.settable.get(key).cloned())
            .collect()
    }
}

/// Why the route table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The pool has no `google.api.http` extension.
    #[error("the descriptor set does not define google.api.http")]
    NoHttpExtension,
    /// A rule is malformed.
    #[error("{method}: {reason}")]
    BadRule {
        /// The RPC.
        method: String,
        /// What is wrong.
        reason: String,
    },
    /// Two rules match the same requests.
    #[error("{first} and {second} both bind {http_method} {template}")]
    Conflict {
        /// One RPC.
        first: String,
        /// The other.
        second: String,
        /// The HTTP method.
        http_method: Method,
        /// The template.
        template: String,
    },
}

/// What a request path and method resolved to.
#[derive(Debug)]
pub enum Resolved<'a> {
    /// A route, with its path variables.
    Found(&'a Route, Vec<(&'a str, String)>),
    /// The path exists under other methods.
    MethodNotAllowed(Vec<Method>),
    /// No rule matches the path.
    NotFound,
}

/// Every route of a pool.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// The routes of every RPC in `pool` that has a `google.api.http` option. Malformed rules and
    /// conflicts are start-up errors.
    pub fn from_pool(pool: &DescriptorPool) -> Result<Self, RouteError> {
        let http = pool
            .get_extension_by_name("google.api.http")
            .ok_or(RouteError::NoHttpExtension)?;
        let mut routes = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&http) {
                    continue;
                }
                let Value::Message(rule) = options.get_extension(&http).into_owned() else {
                    continue;
                };
                let mut bindings = vec![rule.clone()];
                if let Some(Value::List(more)) = rule
                    .get_field_by_name("additional_bindings")
                    .map(|v| v.into_owned())
                {
                    bindings.extend(more.into_iter().filter_map(|v| match v {
                        Value::Message(m) => Some(m),
                        _ => None,
                    }));
                }
                for binding in bindings {
                    routes.push(route(&method, &binding)?);
                }
            }
        }
        for (i, a) in routes.iter().enumerate() {
            for b in &routes[i + 1..] {
                if a.http_method == b.http_method && a.template.same_shape(&b.template) {
                    return Err(RouteError::Conflict {
                        first: a.method.full_name().to_owned(),
                        second: b.method.full_name().to_owned(),
                        http_method: a.http_method.clone(),
                        template: a.template.to_string(),
                    });
                }
            }
        }
        Ok(Self { routes })
    }

    /// The same routes, each rendering its response with `renderer`'s answer for the response
    /// message's full name, where it has one.
    #[must_use]
    pub fn rendering_with(
        mut self,
        renderer: impl Fn(&str) -> Option<crate::transcode::Render>,
    ) -> Self {
        for route in &mut self.routes {
            route.render = renderer(route.method.output().full_name());
        }
        self
    }

    /// The same routes, each building its request message with `parser`'s answer for the
    /// request message's full name, where it has one.
    #[must_use]
    pub fn parsing_with(
        mut self,
        parser: impl Fn(&str) -> Option<crate::transcode::Parse>,
    ) -> Self {
        for route in &mut self.routes {
            route.parse = parser(route.method.input().full_name());
        }
        self
    }

    /// The routes that satisfy `keep`.
    pub fn retain(mut self, keep: impl Fn(&Route) -> bool) -> Self {
        self.routes.retain(|r| keep(r));
        self
    }

    /// Every route.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `method` and `path` (still percent-encoded), the most specific if several.
    pub fn resolve<'a>(&'a self, method: &Method, path: &str) -> Resolved<'a> {
        let mut best: Option<&Route> = None;
        let mut allowed = Vec::new();
        let Some(path) = SplitPath::new(path) else {
            return Resolved::NotFound;
        };
        for route in &self.routes {
            if route.template.fits(&path).is_none() {
                continue;
            }
            // HEAD is answered like GET.
            let same = route.http_method == method
                || (method == Method::HEAD && route.http_method == Method::GET);
            if !same {
                if !allowed.contains(&route.http_method) {
                    allowed.push(route.http_method.clone());
                }
                continue;
            }
            if best.is_none_or(|b| route.template.specificity() > b.template.specificity()) {
                best = Some(route);
            }
        }
        match best {
            Some(route) => {
                let parts = route.template.fits(&path).expect("it fitted above");
                Resolved::Found(route, route.template.values(parts))
            }
            None if !allowed.is_empty() => Resolved::MethodNotAllowed(allowed),
            None => Resolved::NotFound,
        }
    }
}

/// The route an `google.api.http` `rule` gives `method`, checked against the method's messages.
fn route(method: &MethodDescriptor, rule: &DynamicMessage) -> Result<Route, RouteError> {
    let bad = |reason: String| RouteError::BadRule {
        method: method.full_name().to_owned(),
        reason,
    };
    let (http_method, path) = pattern(rule).map_err(bad)?;
    let template = PathTemplate::parse(&path).map_err(|e| bad(e.to_string()))?;
    let input = method.input();
    for variable in &template.variables {
        let kind = leaf_kind(&input, &variable.field_path).ok_or_else(|| {
            bad(format!(
                "path variable {} is not a field of {}",
                variable.field_path,
                input.full_name()
            ))
        })?;
        if matches!(kind, Kind::Message(_)) {
            return Err(bad(format!(
                "path variable {} is a message",
                variable.field_path
            )));
        }
    }
    let body = match text(rule, "body").as_str() {
        "" => BodyMapping::None,
        "*" => BodyMapping::All,
        field => {
            if input.get_field_by_name(field).is_none() {
                return Err(bad(format!(
                    "body field {field} is not a field of {}",
                    input.full_name()
                )));
            }
            BodyMapping::Field(field.to_owned())
        }
    };
    let response_body = Some(text(rule, "response_body")).filter(|f| !f.is_empty());
    if let Some(field) = &response_body
        && method.output().get_field_by_name(field).is_none()
    {
        return Err(bad(format!(
            "response_body {field} is not a field of {}",
            method.output().full_name()
        )));
    }
    let implied_mask = ImpliedMask::of(&http_method, method, &body);
    Ok(Route {
        http_method,
        template,
        body,
        response_body,
        grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
        implied_mask,
        method: method.clone(),
        render: None,
        parse: None,
    })
}

/// A string field of `message`, empty when unset.
fn text(message: &DynamicMessage, name: &str) -> String {
    match message.get_field_by_name(name).map(|v| v.into_owned()) {
        Some(Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The rule's HTTP method and path template: one of get/put/post/delete/patch, or custom.
fn pattern(rule: &DynamicMessage) -> Result<(Method, String), String> {
    let mut pattern = None;
    for (field, http_method) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        let path = text(rule, field);
        if !path.is_empty() {
            pattern = Some((http_method, path));
        }
    }
    if let Some(Value::Message(custom)) = rule.get_field_by_name("custom").map(|v| v.into_owned()) {
        let path = text(&custom, "path");
        if !path.is_empty() {
            let http_method = Method::from_bytes(text(&custom, "kind").as_bytes())
                .map_err(|e| format!("custom kind: {e}"))?;
            pattern = Some((http_method, path));
        }
    }
    pattern.ok_or_else(|| "no pattern".to_owned())
}

/// The kind of the field at a dotted path, if every step exists and all but the last are
/// singular messages.
pub fn leaf_kind(message: &MessageDescriptor, path: &str) -> Option<Kind> {
    let mut current = message.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current.get_field_by_name(part)?;
        if parts.peek().is_none() {
            return Some(field.kind());
        }
        match field.kind() {
            Kind::Message(next) if !field.is_list() && !field.is_map() => current = next,
            _ => return None,
        }
    }
    None
}
