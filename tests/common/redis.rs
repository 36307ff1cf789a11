//! A real `redis-server` (Debian's package; `make test` installs it) started per test on a free
//! port of 127.0.0.1, with no persistence; killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Redis.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Its working directory (no data is saved there).
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A Redis on a free port.
    pub fn start() -> RedisServer {
        RedisServer::start_on(super::free_addr().port())
    }

    /// A Redis on `port` (e.g. one started anew where another was killed).
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer {
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // DEBUG SLEEP stands in for a Redis that stops answering for a while.
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; `make test` installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The config section pointing keygate at this Redis.
    pub fn yaml(&self) -> String {
        format!("redis:\n  url: \"{}\"\n", self.url())
    }

    /// Saves its data (SAVE), kills it and starts it again on the same port with that data:
    /// an outage after which the store still holds what it held.
    pub fn restart_with_data(&mut self, down_for: Duration) {
        assert_eq!(self.cli(&["SAVE"]).trim(), "OK");
        self.kill();
        std::thread::sleep(down_for);
        self.spawn();
    }

    /// Kills it at once (SIGKILL): no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Makes it stop answering for `seconds` (DEBUG SLEEP), without dropping any connection;
    /// returns at once.
    pub fn stall(&self, seconds: f64) -> std::process::Child {
        Command::new("redis-cli")
            .args([
                "-p",
                &self.port.to_string(),
                "DEBUG",
                "SLEEP",
                &seconds.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-cli")
    }

    /// Runs `redis-cli` against it; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key in it with its value (`GET`; other types as their type name).
    pub fn dump(&self) -> Vec<(String, String)> {
        self.cli(&["--scan"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(|name| {
                let value = if self.cli(&["TYPE", name]).trim() == "hash" {
                    self.cli(&["HGETALL", name])
                } else {
                    self.cli(&["GET", name])
                };
                (name.to_string(), value)
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay in front of a Redis that a test can cut: an instance pointed at it loses Redis
/// (its connections dropped, new ones refused) while the others keep theirs.
pub struct RedisGate {
    /// The port instances connect to.
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    relays: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl RedisGate {
    /// A gate to the Redis on `target`, open.
    pub async fn start(target: u16) -> RedisGate {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let relays = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, r) = (open.clone(), relays.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !o.load(SeqCst) {
                    continue; // dropped: refused
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                r.lock().unwrap().push(relay.abort_handle());
            }
        });
        RedisGate { port, open, relays }
    }

    /// The config section pointing keygate at the gate.
    pub fn yaml(&self) -> String {
        format!("redis:\n  url: \"redis://127.0.0.1:{}/0\"\n", self.port)
    }

    /// Drops every connection through the gate and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A slow link to a Redis: every reply reaches the instance `delay` after Redis sent it (a
/// Redis far away, or slow to answer), without holding up the replies that follow.
pub struct RedisLink {
    /// The port instances connect to.
    pub port: u16,
}

impl RedisLink {
    /// A link to the Redis on `target` whose replies take `delay`.
    pub async fn start(target: u16, delay: Duration) -> RedisLink {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        while let Some((due, bytes)) = rx.recv().await {
                            tokio::time::sleep_until(due).await;
                            let bytes: Vec<u8> = bytes;
                            if client_write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_read.read(&mut buf).await {
                        let due = tokio::time::Instant::now() + delay;
                        if n == 0 || tx.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        RedisLink { port }
    }

    /// The config section pointing keygate at the link, with `timeout_ms`.
    pub fn yaml(&self, timeout_ms: u64) -> String {
        format!(
            "redis:\n  url: \"redis://127.0.0.1:{}/0\"\n  timeout_ms: {timeout_ms}\n",
            self.port
        )
    }
}
