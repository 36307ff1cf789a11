//! Outbound proxies: a pool may reach Google through an HTTP (CONNECT) or SOCKS5 proxy, for a
//! region Google serves or a company's egress.
//!
//! The proxy is plugged into Pingora's connector as a custom layer-4 connect: Pingora asks for
//! a TCP stream, this module opens it to the proxy and has the proxy tunnel it to the upstream
//! (by host name: the proxy resolves it), and Pingora runs TLS, HTTP/2 and connection reuse over
//! the tunnel as over any socket. A proxy that cannot be reached, or refuses the tunnel, is a
//! connect error naming the pool's proxy: the request is retried like any connect error, and no
//! key is blamed.

use crate::secret::Secret;
use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType};
use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest CONNECT answer head read.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

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

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{p:?} is not a port"))
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

/// The connect step of one pool's upstream through its proxy.
#[derive(Debug)]
pub struct ProxyConnect {
    proxy: ProxyConfig,
    pool: String,
    target_host: String,
    target_port: u16,
    timeout: Duration,
}

impl ProxyConnect {
    /// Tunnels to `target_host:target_port` through `proxy`, for pool `pool`.
    pub fn new(
        proxy: ProxyConfig,
        pool: &str,
        target_host: &str,
        target_port: u16,
        timeout: Duration,
    ) -> ProxyConnect {
        ProxyConnect {
            proxy,
            pool: pool.to_string(),
            target_host: target_host.to_string(),
            target_port,
            timeout,
        }
    }

    fn fail(&self, etype: ErrorType, why: impl fmt::Display) -> Box<Error> {
        Error::explain(
            etype,
            format!(
                "the proxy of pool '{}' ({}) failed: {why}",
                self.pool,
                self.proxy.label()
            ),
        )
    }

    async fn tunnel(&self) -> pingora::Result<TcpStream> {
        let mut tcp = TcpStream::connect((self.proxy.host.as_str(), self.proxy.port))
            .await
            .map_err(|e| {
                self.fail(
                    ErrorType::ConnectProxyFailure,
                    format!("cannot connect to it: {e}"),
                )
            })?;
        let _ = tcp.set_nodelay(true);
        match self.proxy.kind {
            ProxyKind::HttpConnect => self.http_connect(&mut tcp).await?,
            ProxyKind::Socks5 => self.socks5(&mut tcp).await?,
        }
        Ok(tcp)
    }

    async fn http_connect(&self, tcp: &mut TcpStream) -> pingora::Result<()> {
        let authority = if self.target_host.contains(':') {
            format!("[{}]:{}", self.target_host, self.target_port)
        } else {
            format!("{}:{}", self.target_host, self.target_port)
        };
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some((user, password)) = &self.proxy.auth {
            let token = base64(format!("{user}:{}", password.expose()).as_bytes());
            head.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        head.push_str("\r\n");
        let io = |e: std::io::Error| self.fail(ErrorType::ConnectProxyFailure, e);
        tcp.write_all(head.as_bytes()).await.map_err(io)?;
        // Read the answer head byte by byte: nothing after it may be consumed, it is the tunnel.
        let mut answer = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= MAX_CONNECT_HEAD {
                return Err(self.fail(ErrorType::ConnectProxyFailure, "answer head too long"));
            }
            let n = tcp.read(&mut byte).await.map_err(io)?;
            if n == 0 {
                return Err(self.fail(
                    ErrorType::ConnectProxyFailure,
                    "connection closed before answering CONNECT",
                ));
            }
            answer.push(byte[0]);
        }
        let status_line = String::from_utf8_lossy(&answer);
        let status_line = status_line.lines().next().unwrap_or("");
        let code = status_line.split_whitespace().nth(1).unwrap_or("");
        if !code.starts_with('2') {
            return Err(self.fail(
                ErrorType::ConnectProxyFailure,
                format!("CONNECT refused: {}", status_line.trim()),
            ));
        }
        Ok(())
    }

    async fn socks5(&self, tcp: &mut TcpStream) -> pingora::Result<()> {
        let io = |e: std::io::Error| self.fail(ErrorType::ConnectProxyFailure, e);
        let method = if self.proxy.auth.is_some() {
            0x02
        } else {
            0x00
        };
        tcp.write_all(&[0x05, 0x01, method]).await.map_err(io)?;
        let mut choice = [0u8; 2];
        tcp.read_exact(&mut choice).await.map_err(io)?;
        if choice[0] != 0x05 || choice[1] != method {
            return Err(self.fail(
                ErrorType::ConnectProxyFailure,
                "the SOCKS5 server refused the authentication method",
            ));
        }
        if let Some((user, password)) = &self.proxy.auth {
            let (u, p) = (user.as_bytes(), password.expose().as_bytes());
            if u.len() > 255 || p.len() > 255 {
                return Err(self.fail(ErrorType::ConnectProxyFailure, "credentials too long"));
            }
            let mut msg = vec![0x01, u.len() as u8];
            msg.extend_from_slice(u);
            msg.push(p.len() as u8);
            msg.extend_from_slice(p);
            tcp.write_all(&msg).await.map_err(io)?;
            let mut status = [0u8; 2];
            tcp.read_exact(&mut status).await.map_err(io)?;
            if status[1] != 0x00 {
                return Err(self.fail(
                    ErrorType::ConnectProxyFailure,
                    "the SOCKS5 server refused the credentials",
                ));
            }
        }
        let mut request = vec![0x05, 0x01, 0x00];
        match self.target_host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => {
                request.push(0x01);
                request.extend_from_slice(&ip.octets());
            }
            Ok(std::net::IpAddr::V6(ip)) => {
                request.push(0x04);
                request.extend_from_slice(&ip.octets());
            }
            Err(_) => {
                let name = self.target_host.as_bytes();
                if name.len() > 255 {
                    return Err(self.fail(ErrorType::ConnectProxyFailure, "host name too long"));
                }
                request.push(0x03);
                request.push(name.len() as u8);
                request.extend_from_slice(name);
            }
        }
        request.extend_from_slice(&self.target_port.to_be_bytes());
        tcp.write_all(&request).await.map_err(io)?;
        let mut reply = [0u8; 4];
        tcp.read_exact(&mut reply).await.map_err(io)?;
        if reply[1] != 0x00 {
            return Err(self.fail(
                ErrorType::ConnectProxyFailure,
                format!(
                    "the SOCKS5 server could not connect ({})",
                    socks_reply(reply[1])
                ),
            ));
        }
        // Skip the bound address that closes the reply.
        let skip = match reply[3] {
            0x01 => 4 + 2,
            0x04 => 16 + 2,
            0x03 => {
                let mut len = [0u8; 1];
                tcp.read_exact(&mut len).await.map_err(io)?;
                usize::from(len[0]) + 2
            }
            _ => return Err(self.fail(ErrorType::ConnectProxyFailure, "malformed SOCKS5 reply")),
        };
        let mut rest = vec![0u8; skip];
        tcp.read_exact(&mut rest).await.map_err(io)?;
        Ok(())
    }
}

#[async_trait]
impl L4Connect for ProxyConnect {
    async fn connect(&self, _addr: &SocketAddr) -> pingora::Result<Stream> {
        match tokio::time::timeout(self.timeout, self.tunnel()).await {
            Ok(Ok(tcp)) => Ok(tcp.into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.fail(ErrorType::ConnectProxyFailure, "timed out")),
        }
    }
}

fn socks_reply(code: u8) -> &'static str {
    match code {
        0x01 => "general failure",
        0x02 => "not allowed by its rules",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "unknown error",
    }
}

/// Standard base64 with padding, for `Proxy-Authorization: Basic`.
fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls_without_credentials() {
        let p = ProxyConfig::parse("http://proxy.corp:3128", None).unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port),
            (ProxyKind::HttpConnect, "proxy.corp", 3128)
        );
        let s = ProxyConfig::parse("socks5://127.0.0.1", None).unwrap();
        assert_eq!((s.kind, s.port), (ProxyKind::Socks5, 1080));
        let v6 = ProxyConfig::parse("socks5://[::1]:9050", None).unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9050));
        assert!(ProxyConfig::parse("http://user:pw@proxy:3128", None)
            .unwrap_err()
            .contains("proxy_auth_env"));
        assert!(ProxyConfig::parse("ftp://x", None).is_err());
        assert!(ProxyConfig::parse("http://x:0", None).is_err());
        assert!(ProxyConfig::parse("http://::1:80", None).is_err());
        let with =
            ProxyConfig::parse("http://p:1", Some(("u".into(), Secret::new("hunter2")))).unwrap();
        assert!(!format!("{with:?}").contains("hunter2"));
    }

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }
}
