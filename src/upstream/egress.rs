//! Outbound proxies: a pool may reach Google through an HTTP (CONNECT) or SOCKS5 proxy, for a
//! region Google serves or a company's egress.
//!
//! The proxy is plugged into Pingora's connector as a custom layer-4 connect: Pingora asks for
//! a TCP stream, this module opens it to the proxy and has the proxy tunnel it to the upstream
//! (by host name: the proxy resolves it), and Pingora runs TLS, HTTP/2 and connection reuse over
//! the tunnel as over any socket. A proxy that cannot be reached, or refuses the tunnel, is a
//! connect error naming the pool's proxy: the request is retried like any connect error, and no
//! key is blamed.

use crate::config::{ProxyConfig, ProxyKind};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType};
use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_socks::tcp::Socks5Stream;

/// Largest CONNECT answer head read.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

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
            ProxyKind::HttpConnect => {
                self.http_connect(&mut tcp).await?;
                Ok(tcp)
            }
            ProxyKind::Socks5 => self.socks5(tcp).await,
        }
    }

    async fn http_connect(&self, tcp: &mut TcpStream) -> pingora::Result<()> {
        let authority = if self.target_host.contains(':') {
            format!("[{}]:{}", self.target_host, self.target_port)
        } else {
            format!("{}:{}", self.target_host, self.target_port)
        };
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some((user, password)) = &self.proxy.auth {
            let token = STANDARD.encode(format!("{user}:{}", password.expose()));
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

    /// Has the SOCKS5 server (RFC 1928, RFC 1929 for the credentials) open the tunnel. The
    /// target host goes to the proxy as a name, so the proxy resolves it.
    async fn socks5(&self, tcp: TcpStream) -> pingora::Result<TcpStream> {
        let target = (self.target_host.as_str(), self.target_port);
        let stream = match &self.proxy.auth {
            Some((user, password)) => {
                Socks5Stream::connect_with_password_and_socket(tcp, target, user, password.expose())
                    .await
            }
            None => Socks5Stream::connect_with_socket(tcp, target).await,
        };
        stream
            .map(Socks5Stream::into_inner)
            .map_err(|e| self.fail(ErrorType::ConnectProxyFailure, socks_error(e)))
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

/// Why the SOCKS5 handshake failed, in keygate's words (tokio-socks's own messages name no
/// credential either; the mapping keeps the wording operators already know).
fn socks_error(e: tokio_socks::Error) -> String {
    use tokio_socks::Error as E;
    match e {
        E::Io(e) => e.to_string(),
        E::NoAcceptableAuthMethods | E::UnknownAuthMethod | E::AuthorizationRequired => {
            "the SOCKS5 server refused the authentication method".into()
        }
        E::PasswordAuthFailure(_) => "the SOCKS5 server refused the credentials".into(),
        E::InvalidAuthValues(_) => "user name and password must each be 1 to 255 bytes".into(),
        E::InvalidTargetAddress(_) => "host name too long".into(),
        E::GeneralSocksServerFailure
        | E::ConnectionNotAllowedByRuleset
        | E::NetworkUnreachable
        | E::HostUnreachable
        | E::ConnectionRefused
        | E::TtlExpired
        | E::CommandNotSupported
        | E::AddressTypeNotSupported
        | E::UnknownError => format!(
            "the SOCKS5 server could not connect ({})",
            e.to_string().to_lowercase()
        ),
        other => format!(
            "malformed SOCKS5 reply ({})",
            other.to_string().to_lowercase()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

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

    /// A one-shot SOCKS5 server on port 0 that asks for a password, answers the credentials
    /// with `auth_status`, and returns the CONNECT request it read (after answering success).
    async fn one_socks5_server(auth_status: u8) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 2];
            s.read_exact(&mut greeting).await.unwrap();
            let mut methods = vec![0u8; usize::from(greeting[1])];
            s.read_exact(&mut methods).await.unwrap();
            assert!(methods.contains(&2), "{methods:?}");
            s.write_all(&[5, 2]).await.unwrap();
            let mut auth = [0u8; 2];
            s.read_exact(&mut auth).await.unwrap();
            let mut rest = vec![0u8; usize::from(auth[1])];
            s.read_exact(&mut rest).await.unwrap();
            let plen = usize::from(s.read_u8().await.unwrap());
            s.read_exact(&mut vec![0u8; plen]).await.unwrap();
            s.write_all(&[1, auth_status]).await.unwrap();
            let mut request = vec![0u8; 64];
            if auth_status == 0 {
                let n = s.read(&mut request).await.unwrap();
                request.truncate(n);
                s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 80])
                    .await
                    .unwrap();
            }
            request
        });
        (port, server)
    }

    fn through(port: u16, password: &str) -> ProxyConnect {
        let proxy = ProxyConfig::parse(
            &format!("socks5://127.0.0.1:{port}"),
            Some(("bob".into(), Secret::new(password))),
        )
        .unwrap();
        ProxyConnect::new(
            proxy,
            "tor",
            "generativelanguage.googleapis.com",
            443,
            Duration::from_secs(5),
        )
    }

    #[tokio::test]
    async fn socks5_passes_the_host_name_to_the_proxy() {
        let (port, server) = one_socks5_server(0).await;
        through(port, "proxy-pass").tunnel().await.unwrap();
        let request = server.await.unwrap();
        let name = b"generativelanguage.googleapis.com";
        let mut want = vec![5, 1, 0, 3, name.len() as u8];
        want.extend_from_slice(name);
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(request, want);
    }

    #[tokio::test]
    async fn socks5_refusal_names_the_pool_not_the_password() {
        let (port, server) = one_socks5_server(1).await;
        let err = through(port, "proxy-pass").tunnel().await.unwrap_err();
        server.await.unwrap();
        let text = err.to_string();
        assert!(
            text.contains("the proxy of pool 'tor'") && text.contains("refused the credentials"),
            "{text}"
        );
        assert!(!text.contains("proxy-pass"), "{text}");
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
            assert_eq!(STANDARD.encode(input), want);
        }
    }
}
