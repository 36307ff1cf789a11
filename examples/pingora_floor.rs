//! The framework's floor for the load benchmark: the smallest Pingora proxy that does what
//! keygate's hot path must do (set the key header, forward to one upstream over pooled
//! connections), with Pingora's own proxy loop and nothing else. keygate cannot be faster than
//! this on the same machine; the distance between the two is what keygate's own work costs.
//!
//! `pingora_floor LISTEN UPSTREAM KEY THREADS`, e.g. `pingora_floor 127.0.0.1:8081
//! 127.0.0.1:9000 made-up-key 1`. Built by `make bench` (`cargo build --release --examples`).

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

struct Floor {
    upstream: SocketAddr,
    key: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        request.insert_header("x-goog-api-key", self.key.as_str())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, key, threads] = args.as_slice() else {
        eprintln!("usage: pingora_floor LISTEN UPSTREAM KEY THREADS");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("pingora_floor: UPSTREAM must be an address like 127.0.0.1:9000");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: threads.parse().unwrap_or(1),
        // Like keygate: one single-threaded runtime per worker.
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let floor = Floor {
        upstream,
        key: key.clone(),
    };
    let mut service = http_proxy_service(&server.configuration, floor);
    service.add_tcp(listen);
    server.add_service(service);
    server.run_forever();
}
