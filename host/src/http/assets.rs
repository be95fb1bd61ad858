//! The browser pages: the chat demo at `/`, the dashboard's two pages, and their
//! scripts and style sheet; and the room protocol's browser client at `/roomcast.js`.
//! All of them are compiled into the binary (`include_str!` from `host/web/` and
//! `clients/js/`): no build step, and nothing is loaded from anywhere else, which the
//! Content-Security-Policy header states to the browser too.

use std::borrow::Cow;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Shared;

const DEMO_HTML: &str = include_str!("../../web/demo.html");
const DEMO_JS: &str = include_str!("../../web/demo.js");
const LOGIN_HTML: &str = include_str!("../../web/login.html");
const DASHBOARD_HTML: &str = include_str!("../../web/dashboard.html");
const DASHBOARD_JS: &str = include_str!("../../web/dashboard.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");
/// The browser client (an ES module), also kept as a package of its own in `clients/js/`.
const CLIENT_JS: &str = include_str!("../../../clients/js/roomcast.js");

/// Scripts and styles only from this server, WebSockets and event streams only to it,
/// no framing by other sites.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// A page the server can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Asset {
    Demo,
    Login,
    /// The token form again, saying the token was wrong.
    LoginFailed,
    Dashboard,
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(|| async { page(Asset::Demo) }))
        .route("/assets/demo.js", get(|| async { file("text/javascript; charset=utf-8", DEMO_JS) }))
        .route("/assets/dashboard.js", get(|| async { file("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/assets/style.css", get(|| async { file("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/roomcast.js", get(|| async { file("text/javascript; charset=utf-8", CLIENT_JS) }))
}

/// An HTML page with the security headers; never cached (the dashboard's pages depend
/// on the session).
pub(crate) fn page(asset: Asset) -> Response {
    let html: Cow<'static, str> = match asset {
        Asset::Demo => DEMO_HTML.into(),
        Asset::Login => LOGIN_HTML.into(),
        Asset::LoginFailed => LOGIN_HTML
            .replace(
                "<!--error-->",
                "<p class=\"error\" role=\"alert\">That token is not right. Try again.</p>",
            )
            .into(),
        Asset::Dashboard => DASHBOARD_HTML.into(),
    };
    let mut response = file("text/html; charset=utf-8", html).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn file(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], body.into())
        .into_response()
}
