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

    /// WCAG 2 contrast of two `#rrggbb` colours.
    fn contrast(a: &str, b: &str) -> f64 {
        let luminance = |hex: &str| {
            let channel = |i: usize| {
                let c = f64::from(u8::from_str_radix(&hex[i..i + 2], 16).unwrap()) / 255.0;
                if c <= 0.03928 {
                    c / 12.92
                } else {
                    ((c + 0.055) / 1.055).powf(2.4)
                }
            };
            0.2126 * channel(1) + 0.7152 * channel(3) + 0.0722 * channel(5)
        };
        let (x, y) = (luminance(a), luminance(b));
        (x.max(y) + 0.05) / (x.min(y) + 0.05)
    }

    #[test]
    fn text_colours_pass_wcag_aa_on_their_backgrounds() {
        let css = std::str::from_utf8(asset("/dashboard.css").unwrap().body).unwrap();
        let var = |name: &str| {
            let at = css.find(&format!("--{name}:")).unwrap() + name.len() + 3;
            css[at..].trim_start()[..7].to_string()
        };
        let white = "#ffffff".to_string();
        let pairs = [
            ("text", var("text"), var("bg")),
            ("text on panels", var("text"), var("panel")),
            ("muted", var("muted"), var("bg")),
            ("muted on panels", var("muted"), var("panel")),
            ("top bar and buttons", white.clone(), var("accent")),
            ("quiet buttons", var("accent"), white.clone()),
            ("ok", var("ok-fg"), var("ok-bg")),
            ("cooling", var("cool-fg"), var("cool-bg")),
            ("disabled", var("off-fg"), var("off-bg")),
            ("danger buttons", var("off-fg"), white),
            ("capped", var("cap-fg"), var("cap-bg")),
        ];
        for (what, fg, bg) in pairs {
            let ratio = contrast(&fg, &bg);
            assert!(ratio >= 4.5, "{what}: {fg} on {bg} is {ratio:.2}:1");
        }
    }
}
