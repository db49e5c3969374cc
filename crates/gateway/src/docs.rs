//! `/docs`: Swagger UI over the gateway's own `/openapi.json`, its assets embedded in the binary.
//!
//! Swagger UI because it is the one viewer whose assets come in a crate (utoipa-swagger-ui's
//! `vendored` feature: no npm, no download at build time, no CDN at run time) and whose page can
//! call the API with a bearer token ("Authorize", then "Try it out").

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use utoipa_swagger_ui::Config;

/// Everything the page may load comes from the gateway itself: scripts, styles and images from
/// `/docs/`, the document and "Try it out" calls from the same origin. Swagger UI sets inline
/// styles, hence `'unsafe-inline'` for styles only.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The docs pages of a gateway titled `title` at `version`.
pub struct Docs {
    config: Arc<Config<'static>>,
    index: String,
}

impl Docs {
    /// Swagger UI for `/openapi.json`, titled `title` and `version`.
    pub fn new(title: &str, version: &str) -> Self {
        let config = Config::new(["/openapi.json"])
            .try_it_out_enabled(true)
            .persist_authorization(true)
            .display_operation_id(true)
            .display_request_duration(true)
            .filter(true)
            // The badge would send the document to validator.swagger.io.
            .validator_url("none");
        let title = escape(&format!("{title} {version} — API"));
        let index = format!(
            r#"<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="./swagger-ui.css">
    <link rel="stylesheet" type="text/css" href="./index.css">
    <link rel="icon" type="image/png" href="./favicon-32x32.png" sizes="32x32">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="./swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"#
        );
        Self {
            config: Arc::new(config),
            index,
        }
    }

    /// `/docs` (redirected to `/docs/`, so that the page's relative asset paths resolve) and
    /// `/docs/{file}`.
    pub fn router<S: Clone + Send + Sync + 'static>(self) -> axum::Router<S> {
        let docs = Arc::new(self);
        axum::Router::new()
            .route("/docs", get(|| async { Redirect::permanent("/docs/") }))
            .route("/docs/", get(index))
            .route("/docs/{file}", get(asset))
            .with_state(docs)
    }
}

async fn index(State(docs): State<Arc<Docs>>) -> Response {
    page("text/html; charset=utf-8", docs.index.clone().into_bytes())
}

async fn asset(State(docs): State<Arc<Docs>>, Path(file): Path<String>) -> Response {
    if file == "index.html" {
        return Redirect::permanent("/docs/").into_response();
    }
    match utoipa_swagger_ui::serve(&file, docs.config.clone()) {
        Ok(Some(found)) => page(&found.content_type, found.bytes.into_owned()),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => {
            tracing::error!(error = %e, file, "docs asset");
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

fn page(content_type: &str, body: Vec<u8>) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initializer_points_at_the_gateways_own_document() {
        let docs = Docs::new("keel", "1.2.3");
        let file = utoipa_swagger_ui::serve("swagger-initializer.js", docs.config.clone())
            .unwrap()
            .unwrap();
        let script = String::from_utf8(file.bytes.into_owned()).unwrap();
        assert!(script.contains("\"/openapi.json\""), "{script}");
        assert!(script.contains("\"validatorUrl\": \"none\""), "{script}");
        assert!(!script.contains("petstore"), "{script}");
        assert!(docs.index.contains("<title>keel 1.2.3 — API</title>"));
    }
}
