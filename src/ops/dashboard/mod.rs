//! The operators' dashboard: one page, its script, its style sheet and its icon, embedded in
//! the binary and served by the admin listener at `/` without the token (they hold no data).
//! The page asks for the admin token, keeps it in the tab's `sessionStorage` only, and reads
//! the admin API with `Authorization: Bearer`; every answer carries the headers below.
//!
//! Nothing is loaded from another origin and no build step runs: the script is hand-written,
//! builds the page with `textContent` only (names from the config, tenants or Google may hold
//! markup), and the Content-Security-Policy forbids inline script and any other origin.

/// The Content-Security-Policy of every admin answer: nothing but this origin's own script,
/// style and images; no inline script or style, no framing, no form posts, no `<base>`; and
/// Trusted Types with no policy, so that any HTML sink (`innerHTML`) throws in the browser.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
     require-trusted-types-for 'script'; trusted-types 'none'";

/// Headers every admin answer carries, data and dashboard alike (and no CORS header, ever).
pub const SECURITY_HEADERS: [(&str, &str); 7] = [
    ("content-security-policy", CSP),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
];

/// One embedded file.
pub struct Asset {
    /// Its `content-type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// The embedded file served at `path`, if any.
pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, body): (&str, &[u8]) = match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_bytes!("assets/index.html"),
        ),
        "/dashboard.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("assets/dashboard.js"),
        ),
        "/dashboard.css" => (
            "text/css; charset=utf-8",
            include_bytes!("assets/dashboard.css"),
        ),
        "/icon.svg" | "/favicon.ico" => ("image/svg+xml", include_bytes!("assets/icon.svg")),
        _ => return None,
    };
    Some(Asset { content_type, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_only_its_own_files() {
        let page = std::str::from_utf8(asset("/").unwrap().body).unwrap();
        assert!(
            !page.contains("<script>") && !page.contains("style="),
            "{page}"
        );
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(page.contains(r#"<script src="/dashboard.js" defer></script>"#));
        let js = std::str::from_utf8(asset("/dashboard.js").unwrap().body).unwrap();
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!js.contains(banned), "the script uses {banned}");
        }
        assert!(!js.contains("localStorage.") && !js.contains("document.cookie"));
        assert!(js.contains("sessionStorage.setItem(TOKEN"));
        assert!(asset("/admin/pools").is_none());
    }
}
