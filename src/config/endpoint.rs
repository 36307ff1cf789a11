//! Where keygate connects to, as the configuration names it: upstreams
//! (`http(s)://host[:port][/base/path]`, with pinned addresses and headers of their own),
//! outbound proxies (`http://` or `socks5://`) and webhook URLs. One parser for the three, so
//! they accept and refuse the same spellings.

use super::UpstreamConfig;
use crate::secret::Secret;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Parses `http(s)://host[:port][/base/path]` (no query, no credentials). A base path (a relay
/// such as Cloudflare's AI Gateway) is kept without its trailing slash; every outbound path is
/// appended to it.
///
/// By hand rather than with `http::Uri`, which is lenient where a config file must not be: it
/// reads `host:99999` and `host:` as "no port" (so the default port, silently), drops a
/// `#fragment` and takes `HTTP://`. The alert URLs and egress proxy URLs are checked the same way.
pub fn parse_upstream(text: &str) -> Result<UpstreamConfig, String> {
    let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = text.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("must start with http:// or https://".into());
    };
    let (rest, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if rest.contains(['?', '#', '@']) || path.contains(['?', '#']) {
        return Err(
            "must be scheme://host[:port][/base/path] with no query, fragment or credentials"
                .into(),
        );
    }
    let base_path = base_path(path)?;
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (h, after) = inner.split_once(']').ok_or("unclosed [ in IPv6 address")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("unexpected text after ]".into()),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
        None if tls => 443,
        None => 80,
    };
    Ok(UpstreamConfig {
        tls,
        host,
        port,
        addresses: Vec::new(),
        base_path,
        headers: Vec::new(),
    })
}

/// Checks an upstream's base path (`/v1/ACCOUNT/GATEWAY/google-ai-studio`, or empty): plain
/// segments only, so the path keygate sends is the one it decided on; returned without its
/// trailing slash.
fn base_path(path: &str) -> Result<String, String> {
    let path = path.trim_end_matches('/');
    for segment in path.split('/').skip(1) {
        let plain = segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b));
        if segment.is_empty() || segment == "." || segment == ".." || !plain {
            return Err(format!(
                "the base path {path:?} may hold only plain segments (no //, . or .., %-escapes, spaces)"
            ));
        }
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    if matches!(
        last,
        "v1" | "v1beta" | "v1alpha" | "upload" | "openai" | "models"
    ) {
        return Err(format!(
            "the client's path (/v1beta/models/...) is appended to the base path {path:?}: leave \
             the API's own path out (https://generativelanguage.googleapis.com, not .../{last})"
        ));
    }
    Ok(path.to_string())
}

/// Headers a pool may not set with `upstream_headers`: keygate sets the key and the host itself,
/// and the rest belong to the connection or the message framing.
const RESERVED_HEADERS: [&str; 11] = [
    "x-goog-api-key",
    "authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
];

/// A pool's `upstream_headers`: lower-case names, values read from the environment (never
/// written in the file, never echoed in an error).
pub(super) fn upstream_headers(
    headers: &std::collections::BTreeMap<String, super::file::FileEnvValue>,
    ctx: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, Secret)>, super::ConfigError> {
    use super::file::FileEnvValue;
    use super::validate::invalid;
    let mut out: Vec<(String, Secret)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let lower = name.trim().to_ascii_lowercase();
        let ctx = format!("{ctx}.upstream_headers.{lower}");
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            return Err(invalid(format!("{ctx}: not a header name")));
        }
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            return Err(invalid(format!(
                "{ctx}: keygate sets this header itself (x-goog-api-key, authorization and host carry the pool key and the upstream; the others the connection)"
            )));
        }
        if out.iter().any(|(n, _)| *n == lower) {
            return Err(invalid(format!("{ctx}: given twice")));
        }
        let FileEnvValue::Env(var) = value else {
            return Err(invalid(format!(
                "{ctx}: write {{env: VARIABLE}}: a header's value comes from the environment, never from the file"
            )));
        };
        let Some(text) = env(&var.env) else {
            return Err(invalid(format!(
                "{ctx}: environment variable {} is not set",
                var.env
            )));
        };
        let text = text.trim();
        if text.is_empty() || http::HeaderValue::from_str(text).is_err() {
            return Err(invalid(format!(
                "{ctx}: ${} must hold a header value (visible ASCII and spaces)",
                var.env
            )));
        }
        out.push((lower, Secret::new(text)));
    }
    Ok(out)
}

/// Most addresses one upstream may pin.
pub const MAX_PINNED_ADDRESSES: usize = 64;

/// Parses pinned upstream addresses: `ip:port`, `[v6]:port`, or a bare IP that takes the
/// upstream's `port`. Duplicates are dropped; the list must not be empty.
pub(super) fn parse_pinned_addresses(
    items: &[String],
    port: u16,
) -> Result<Vec<SocketAddr>, String> {
    if items.is_empty() {
        return Err("must list at least one address; leave it out to look the host up".into());
    }
    if items.len() > MAX_PINNED_ADDRESSES {
        return Err(format!("at most {MAX_PINNED_ADDRESSES} addresses"));
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let text = item.trim();
        let addr = text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, port)))
            .map_err(|_| {
                format!("[{i}]: {text:?} is not an IP address (like 192.0.2.1 or 192.0.2.1:443)")
            })?;
        if addr.port() == 0 {
            return Err(format!("[{i}]: {text:?}: port 0"));
        }
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// The proxy protocols keygate speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// `http://`: an HTTP proxy, tunnelling with `CONNECT host:port`.
    HttpConnect,
    /// `socks5://`: a SOCKS5 proxy (RFC 1928), host names resolved by the proxy.
    Socks5,
}

/// A pool's outbound proxy, as configured.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Protocol.
    pub kind: ProxyKind,
    /// The proxy's host.
    pub host: String,
    /// The proxy's port.
    pub port: u16,
    /// User name and password, from the environment.
    pub auth: Option<(String, Secret)>,
}

impl ProxyConfig {
    /// `scheme://host:port`, without credentials: how logs and errors name the proxy.
    pub fn label(&self) -> String {
        let scheme = match self.kind {
            ProxyKind::HttpConnect => "http",
            ProxyKind::Socks5 => "socks5",
        };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// Parses `http://host:port` or `socks5://host:port` (credentials are refused here: they come
    /// from the environment).
    pub fn parse(text: &str, auth: Option<(String, Secret)>) -> Result<ProxyConfig, String> {
        let (kind, rest, default_port) = if let Some(r) = text.strip_prefix("http://") {
            (ProxyKind::HttpConnect, r, 80)
        } else if let Some(r) = text.strip_prefix("socks5://") {
            (ProxyKind::Socks5, r, 1080)
        } else if let Some(r) = text.strip_prefix("socks5h://") {
            (ProxyKind::Socks5, r, 1080)
        } else {
            return Err("must start with http:// (CONNECT) or socks5://".into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(
                "credentials may not be written in the URL; put `user:password` in the environment variable named by proxy_auth_env".into(),
            );
        }
        if rest.is_empty() || rest.contains(['/', '?', '#']) {
            return Err("must be scheme://host[:port] with no path".into());
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("an IPv6 address needs its closing bracket")?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None if after.is_empty() => default_port,
                None => return Err("expected :port after the IPv6 address".into()),
            };
            (host.to_string(), port)
        } else if rest.matches(':').count() > 1 {
            return Err("write an IPv6 proxy address in brackets: [::1]:3128".into());
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p)?),
                None => (rest.to_string(), default_port),
            }
        };
        Ok(ProxyConfig {
            kind,
            host,
            port,
            auth,
        })
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.label())?;
        if self.auth.is_some() {
            f.write_str(" (with credentials)")?;
        }
        Ok(())
    }
}

/// A parsed webhook URL.
pub struct WebhookTarget {
    /// The webhook's host, port and scheme.
    pub upstream: super::UpstreamConfig,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The absolute URI, for HTTP/2.
    pub uri: http::Uri,
}

/// Checks `http(s)://host[:port]/path[?query]`.
pub fn parse_webhook_url(url: &str) -> Result<WebhookTarget, String> {
    const FORM: &str = "the webhook URL must be http(s)://host[:port]/path";
    let url = url.trim();
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{FORM}: it contains spaces or control characters"));
    }
    let scheme_len = if url.starts_with("https://") {
        8
    } else if url.starts_with("http://") {
        7
    } else {
        return Err(format!("{FORM}: it must start with http:// or https://"));
    };
    let rest = &url[scheme_len..];
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if path.contains('#') {
        return Err(format!("{FORM}: no #fragment"));
    }
    if authority.contains('@') {
        return Err(format!("{FORM}: no user or password before the host"));
    }
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    let upstream = parse_upstream(&format!("{}{authority}", &url[..scheme_len]))
        .map_err(|e| format!("{FORM}: {e}"))?;
    let path_and_query = http::uri::PathAndQuery::try_from(path.as_str())
        .map_err(|_| format!("{FORM}: the path has characters a URL cannot carry"))?;
    let uri = http::Uri::builder()
        .scheme(if upstream.tls { "https" } else { "http" })
        .authority(upstream.authority())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| format!("{FORM}: the host is not valid in a URL"))?;
    Ok(WebhookTarget {
        upstream,
        path,
        uri,
    })
}

/// `scheme://host[:port]/…`: the URL without its path and query.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = rest[..end].rsplit('@').next().unwrap_or("");
    let tail = if end < rest.len() { "/…" } else { "" };
    format!("{scheme}://{host}{tail}")
}

/// A port number other than 0.
fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{p:?} is not a port"))
}
