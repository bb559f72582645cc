//! The web chat app that `genstream serve` serves at `/`.
//!
//! The app is plain ES modules with no build step (`crates/server/ui/`, vendored
//! libraries listed in `ui/assets/vendor/VENDORED.md`), compiled into the binary with
//! rust-embed, so `cargo build` needs no Node and the binary serves the app from any
//! directory. Three kinds of path:
//!
//! - `/` and `/c/{conversationId}` answer the app's one HTML page (the conversation
//!   routes are the app's own, so a deep link or a reload lands on the page, which
//!   reads the id from its URL);
//! - `/assets/{path}` answers a file of `ui/assets/`, with an `ETag` (the file's
//!   SHA-256) so that a reload revalidates with a 304 instead of downloading again;
//! - everything else stays the API's JSON 404.
//!
//! Every answer carries the security headers: a Content-Security-Policy that allows
//! scripts, styles, images and connections from this origin only and no inline script
//! or style at all (model output is rendered as HTML after sanitizing; the policy is the
//! second wall should the sanitizer miss something), `X-Content-Type-Options: nosniff`,
//! `Referrer-Policy: no-referrer` and framing denied. Text assets are gzipped when the
//! client accepts it, which keeps the first load far under 200 KB on the wire.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rust_embed::RustEmbed;
use tower_http::compression::CompressionLayer;
use tower_http::set_header::SetResponseHeaderLayer;

/// The app's files: `index.html` and `assets/…`.
#[derive(RustEmbed)]
#[folder = "ui/"]
#[include = "index.html"]
#[include = "assets/*"]
#[exclude = "*.md"]
struct Files;

/// The page's Content-Security-Policy. `'self'` only, no `'unsafe-inline'` anywhere;
/// `img-src` also takes `data:` URLs (the app's own icons); `frame-ancestors 'none'`
/// and `base-uri 'none'` close clickjacking and `<base>` injection.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The routes of the web app, to be merged into the API router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/c/{conversation_id}", get(index))
        .route("/assets/{*path}", get(asset))
        .layer(CompressionLayer::new().gzip(true))
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ))
}

/// The HTML page, for `/` and every `/c/{id}`.
async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// A file under `assets/`.
async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&format!("assets/{path}"), &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = Files::get(path) else {
        return crate::ApiError::NoRoute(format!("/{path}")).into_response();
    };
    let etag = format!("\"{}\"", hex(&file.metadata.sha256_hash()[..16]));
    // Revalidate on every load: the files have no content hash in their names (there
    // is no build step to put one there), so a long max-age could mix old and new
    // modules after an upgrade; a 304 costs one round trip and no bytes.
    let cache = HeaderValue::from_static("no-cache");
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let etag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    if fresh {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    let mime = file.metadata.mimetype();
    let content_type = if mime.starts_with("text/") || mime == "application/javascript" {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_str(&content_type)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache),
        ],
        file.data,
    )
        .into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        router::<()>()
            .fallback(|| async { StatusCode::IM_A_TEAPOT })
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_page_and_its_deep_links_with_security_headers() {
        for path in ["/", "/c/0193-abc"] {
            let r = get(path, &[]).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        // Only these paths are the app's.
        assert_eq!(get("/c/a/b", &[]).await.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(
            get("/index.html", &[]).await.status(),
            StatusCode::IM_A_TEAPOT
        );
    }

    #[tokio::test]
    async fn assets_have_types_etags_and_gzip() {
        let r = get("/assets/app.js", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let etag = r.headers()[header::ETAG].to_str().unwrap().to_owned();
        let again = get("/assets/app.js", &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let zipped = get("/assets/vendor/purify.mjs", &[("accept-encoding", "gzip")]).await;
        assert_eq!(zipped.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(
            get("/assets/vendor/preact.mjs", &[]).await.headers()[header::CONTENT_TYPE],
            "application/javascript; charset=utf-8"
        );
        // Missing files, and the docs beside the vendored files, are not served.
        for path in [
            "/assets/nope.js",
            "/assets/vendor/VENDORED.md",
            "/assets/../Cargo.toml",
        ] {
            assert_eq!(
                get(path, &[]).await.status(),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
    }
}
