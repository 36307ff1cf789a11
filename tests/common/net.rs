//! Network helpers for tests: a local HTTP CONNECT proxy and a SOCKS5 server (both on
//! 127.0.0.1, port 0, optionally with a username and password), and a WebSocket client.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use tokio_tungstenite::tungstenite::Message;

/// A client's WebSocket, as `ws_connect` returns it.
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a proxy saw.
#[derive(Default)]
struct Log {
    connections: usize,
    targets: Vec<String>,
    auth_failures: usize,
}

/// A running CONNECT proxy or SOCKS5 server. Dropping it closes the listener and every tunnel.
pub struct ProxyServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ProxyServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ProxyServer {
    /// `{scheme}://127.0.0.1:PORT`, e.g. `http://...` or `socks5://...`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.log.lock().unwrap().connections
    }

    /// The `host:port` each tunnel asked for, in order, refused ones included (a SOCKS5 client
    /// that fails authentication never names one).
    pub fn targets(&self) -> Vec<String> {
        self.log.lock().unwrap().targets.clone()
    }

    /// Clients refused for missing or wrong credentials.
    pub fn auth_failures(&self) -> usize {
        self.log.lock().unwrap().auth_failures
    }
}

/// Listens on 127.0.0.1:0 and serves each connection with `serve`; the tasks of the
/// connections live in a `JoinSet` owned by the accept loop, so aborting it ends them too.
async fn start_proxy<F, Fut>(serve: F) -> ProxyServer
where
    F: Fn(TcpStream, Arc<Mutex<Log>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let shared = log.clone();
    let accept = tokio::spawn(async move {
        let mut tunnels = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            shared.lock().unwrap().connections += 1;
            while tunnels.try_join_next().is_some() {}
            tunnels.spawn(serve(stream, shared.clone()));
        }
    });
    ProxyServer {
        addr,
        log,
        tasks: vec![accept],
    }
}

/// Connects to `target` (`host:port`, resolved), giving up after 10 s.
async fn dial(target: &str) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// An HTTP CONNECT proxy. With `auth`, a tunnel needs `Proxy-Authorization: Basic
/// base64(user:pass)` (407 otherwise); a target it cannot reach gets 502, any other method 405.
pub async fn start_connect_proxy(auth: Option<(&str, &str)>) -> ProxyServer {
    let expected = auth.map(|(user, pass)| super::base64(format!("{user}:{pass}").as_bytes()));
    start_proxy(move |stream, log| connect_tunnel(stream, log, expected.clone())).await
}

async fn connect_tunnel(mut client: TcpStream, log: Arc<Mutex<Log>>, expected: Option<String>) {
    // The request head, and whatever the client sent after it.
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(n) if n > 0 && buf.len() < 64 * 1024 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let (method, target) = (request_line.next().unwrap_or(""), request_line.next());
    let answer = |status: &str| {
        format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    };
    let (true, Some(target)) = (method == "CONNECT", target) else {
        let _ = client
            .write_all(answer("405 Method Not Allowed").as_bytes())
            .await;
        return;
    };
    log.lock().unwrap().targets.push(target.to_string());
    if let Some(expected) = expected {
        let given = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("proxy-authorization"))
            .and_then(|(_, value)| {
                let (scheme, credentials) = value.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("basic")
                    .then(|| credentials.trim().to_string())
            });
        if given.as_deref() != Some(expected.as_str()) {
            log.lock().unwrap().auth_failures += 1;
            let refusal = "HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"mock\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            let _ = client.write_all(refusal.as_bytes()).await;
            return;
        }
    }
    let Ok(mut upstream) = dial(target).await else {
        let _ = client.write_all(answer("502 Bad Gateway").as_bytes()).await;
        return;
    };
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
    if client.write_all(established).await.is_err()
        || upstream.write_all(&buf[end..]).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// A SOCKS5 server (RFC 1928, CONNECT only; RFC 1929 username/password when `auth` is set).
pub async fn start_socks5(auth: Option<(&str, &str)>) -> ProxyServer {
    let auth = auth.map(|(user, pass)| (user.to_string(), pass.to_string()));
    start_proxy(move |stream, log| {
        let auth = auth.clone();
        async move {
            let _ = socks5_tunnel(stream, log, auth).await;
        }
    })
    .await
}

async fn socks5_tunnel(
    mut client: TcpStream,
    log: Arc<Mutex<Log>>,
    auth: Option<(String, String)>,
) -> std::io::Result<()> {
    // Greeting: VER NMETHODS METHODS.
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Ok(());
    }
    let mut methods = vec![0u8; head[1] as usize];
    client.read_exact(&mut methods).await?;
    let wanted = if auth.is_some() { 0x02 } else { 0x00 };
    if !methods.contains(&wanted) {
        if auth.is_some() {
            log.lock().unwrap().auth_failures += 1;
        }
        return client.write_all(&[5, 0xFF]).await;
    }
    client.write_all(&[5, wanted]).await?;
    // RFC 1929: VER ULEN UNAME PLEN PASSWD.
    if let Some((user, pass)) = auth {
        client.read_u8().await?; // VER
        let given_user = read_field(&mut client).await?;
        let given_pass = read_field(&mut client).await?;
        if given_user != user.as_bytes() || given_pass != pass.as_bytes() {
            log.lock().unwrap().auth_failures += 1;
            return client.write_all(&[1, 1]).await;
        }
        client.write_all(&[1, 0]).await?;
    }
    // Request: VER CMD RSV ATYP DST.ADDR DST.PORT.
    let mut request = [0u8; 4];
    client.read_exact(&mut request).await?;
    let reply = |code: u8| [5, code, 0, 1, 0, 0, 0, 0, 0, 0];
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).to_string()
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await?;
            format!("[{}]", std::net::Ipv6Addr::from(ip))
        }
        _ => return client.write_all(&reply(0x08)).await, // address type not supported
    };
    let port = client.read_u16().await?;
    let target = format!("{host}:{port}");
    log.lock().unwrap().targets.push(target.clone());
    if request[1] != 1 {
        return client.write_all(&reply(0x07)).await; // command not supported
    }
    let mut upstream = match dial(&target).await {
        Ok(upstream) => upstream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return client.write_all(&reply(0x05)).await;
        }
        Err(_) => return client.write_all(&reply(0x01)).await,
    };
    let bound = upstream.local_addr()?;
    let mut success = vec![5, 0, 0];
    match bound.ip() {
        std::net::IpAddr::V4(ip) => {
            success.push(1);
            success.extend_from_slice(&ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            success.push(4);
            success.extend_from_slice(&ip.octets());
        }
    }
    success.extend_from_slice(&bound.port().to_be_bytes());
    client.write_all(&success).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// One length-prefixed field of RFC 1929.
async fn read_field(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = client.read_u8().await?;
    let mut data = vec![0u8; len as usize];
    client.read_exact(&mut data).await?;
    Ok(data)
}

/// Opens a WebSocket to `url` (`ws://...`) with extra request `headers`; the status of the
/// switch, or `"<status>: <body>"` when the server answered without switching (the body as far
/// as it came with the head).
pub async fn ws_connect(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(WsStream, http::StatusCode), String> {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = http::HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        request.headers_mut().append(name, value);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => Ok((ws, response.status())),
        Err(Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            let body = String::from_utf8_lossy(body);
            Err(format!("{}: {body}", response.status().as_u16()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Opens a Live API session at `url` and sends its `setup`: the socket, once the mock Google
/// has answered `setupComplete`.
pub async fn live_set_up(url: &str, headers: &[(&str, &str)]) -> WsStream {
    use futures_util::{SinkExt, StreamExt};
    let (mut ws, status) = ws_connect(url, headers).await.unwrap();
    assert_eq!(status, 101);
    ws.send(Message::text(r#"{"setup":{"model":"models/gemini-live"}}"#))
        .await
        .unwrap();
    let setup = ws.next().await.unwrap().unwrap();
    assert_eq!(setup.to_text().unwrap(), r#"{"setupComplete":{}}"#);
    ws
}
