//! Where a request goes: its pool, the project bound to the resources it names, and what a
//! successful answer will teach keygate.

use super::{Gateway, Learn};
use crate::logging::printable;
use crate::quota::keys::Millis;
use crate::runtime::{Pool, Route, Runtime};
use crate::tenants::Tenant;
use crate::wire::error::GatewayError;
use crate::wire::request;
use crate::{quota::affinity, wire::alias, wire::names};
use bytes::Bytes;
use pingora::http::RequestHeader;
use std::sync::Arc;

/// Where a request goes, decided before any attempt.
pub(super) struct Placed {
    pub(super) pool: Arc<Pool>,
    /// Name of the only project that may serve it.
    pub(super) project: Option<String>,
    /// The upstream path, when it is not the client's (upload continuations).
    pub(super) path_and_query: Option<String>,
    pub(super) unbound: Vec<String>,
    pub(super) learn: Learn,
}

impl Gateway {
    /// Chooses the pool (and, for resources bound to a project, the project) of a request.
    /// `creates`: [`creates_resources`] of `path`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn place(
        &self,
        rt: &Runtime,
        req: &RequestHeader,
        tenant: Option<&Tenant>,
        path: &str,
        creates: bool,
        model: &str,
        body: &Bytes,
        peer: Option<std::net::IpAddr>,
        now: Millis,
        missing: &mut Vec<String>,
    ) -> Result<Placed, GatewayError> {
        let tenants = !rt.tenants.list().is_empty();
        let mut names = names::names_in_path(path);
        if tenants || !self.shared.affinity.is_empty() {
            for name in names::names_in_body(body) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        // A batch from a file runs whatever requests the file holds, which keygate does not read.
        if tenants && creates && names::has_batch_input_file(body) {
            return Err(GatewayError::new(
                403,
                "PERMISSION_DENIED",
                "keygate: with tenants, a batch must carry its requests inline (inputConfig.requests): keygate cannot check the requests inside an input file",
            ));
        }
        if tenants && names.len() > names::MAX_NAMES {
            return Err(GatewayError::new(
                400,
                "INVALID_ARGUMENT",
                format!(
                    "keygate: a request may name at most {} files, caches or other resources",
                    names::MAX_NAMES
                ),
            ));
        }
        let is_post = req.method == http::Method::POST;
        let learn = if is_post && path.starts_with("/upload/") && request::is_upload_start(req) {
            Learn::UploadStart {
                public_base: self.public_base(rt, req, peer),
            }
        } else if req.method == http::Method::DELETE && !names.is_empty() {
            Learn::Delete(names.clone())
        } else if is_post && creates && creates_interaction(path) {
            Learn::Interaction
        } else if is_post && creates {
            Learn::Create
        } else if tenants && req.method == http::Method::GET && names::is_listing(path) {
            Learn::List
        } else if req.method == http::Method::GET && !names.is_empty() {
            Learn::Read
        } else if req.method == http::Method::GET
            && !rt.model_aliases.is_empty()
            && alias::is_model_listing(path)
            && query_value(req, "pageToken").is_none()
        {
            Learn::Models
        } else {
            Learn::Nothing
        };
        // A name a create request chooses (an upload's `file.name`, a tuned model's id) must not
        // be another tenant's: its resource would be taken over.
        if tenants && matches!(learn, Learn::Create | Learn::UploadStart { .. }) {
            let mut chosen = names::chosen_names(body);
            if let Some(id) = query_value(req, "tunedModelId") {
                chosen.push(format!("tunedModels/{id}"));
            }
            let me = tenant.map(|t| t.name.clone());
            for name in chosen {
                let owner = self.shared.affinity.owner(&name, now);
                if owner.is_none() {
                    // Another instance may know it: asked before the create goes.
                    missing.push(name.clone());
                }
                if owner.is_some_and(|o| o.tenant != me) {
                    return Err(GatewayError::new(
                        403,
                        "PERMISSION_DENIED",
                        format!("keygate: {name} belongs to another tenant"),
                    ));
                }
            }
        }

        // Every resource named must be this tenant's. One keygate does not know is refused with
        // tenants: searching the projects for it could find another tenant's.
        let tenant_name = tenant.map(|t| t.name.clone());
        let mut owner = None;
        let mut unbound = Vec::new();
        let mut unknown = None;
        for name in names {
            match self.shared.affinity.owner(&name, now) {
                Some(o) if o.tenant != tenant_name => {
                    return Err(GatewayError::new(
                        403,
                        "PERMISSION_DENIED",
                        format!("keygate: {name} belongs to another tenant"),
                    ));
                }
                Some(o) => {
                    owner.get_or_insert((name, o));
                }
                None if tenants => {
                    unknown.get_or_insert(GatewayError::new(
                        403,
                        "PERMISSION_DENIED",
                        format!(
                            "keygate: {name} is not known to keygate for this tenant: create it through keygate, or ask an operator to bind it (POST /admin/resources)"
                        ),
                    ));
                    missing.push(name);
                }
                None => {
                    missing.push(name.clone());
                    unbound.push(name);
                }
            }
        }
        if let Some(e) = unknown {
            return Err(e);
        }
        if let Some((name, owner)) = owner {
            let allowed = rt
                .pool_index(&owner.pool)
                .filter(|i| tenant.is_none_or(|t| t.pools.contains(i)));
            let Some(i) = allowed else {
                return Err(GatewayError::new(
                    403,
                    "PERMISSION_DENIED",
                    format!("keygate: {name} was created in a pool this tenant may not use"),
                ));
            };
            // A tenant's pools serve it the models they list, resources or not. (A tuned model
            // is the resource itself.)
            let pool = &rt.pools[i];
            let tuned = model.starts_with("tunedModels/");
            if tenant.is_some() && !model.is_empty() && !tuned && !pool.config.serves(model) {
                return Err(GatewayError::new(
                    403,
                    "PERMISSION_DENIED",
                    format!(
                        "keygate: {name} is in pool '{}', which does not serve model '{}'",
                        pool.name(),
                        printable(model)
                    ),
                ));
            }
            return Ok(Placed {
                pool: rt.pools[i].clone(),
                project: Some(owner.project.to_string()),
                path_and_query: None,
                unbound,
                learn,
            });
        }
        match rt.route(tenant, model) {
            Route::Pool(i) => Ok(Placed {
                pool: rt.pools[i].clone(),
                project: None,
                path_and_query: None,
                unbound,
                learn,
            }),
            Route::NoPool => Err(GatewayError::new(
                403,
                "PERMISSION_DENIED",
                format!(
                    "keygate: model '{}' is not available to this tenant",
                    printable(model)
                ),
            )),
        }
    }

    /// `scheme://host[:port][/prefix]` where clients reach keygate, for the URLs it hands out:
    /// `public_url` when configured; otherwise the `Host` the client used, or the
    /// `X-Forwarded-Proto` / `X-Forwarded-Host` of a trusted proxy in front.
    pub(super) fn public_base(
        &self,
        rt: &Runtime,
        req: &RequestHeader,
        peer: Option<std::net::IpAddr>,
    ) -> String {
        if let Some(url) = &rt.public_url {
            return url.clone();
        }
        let tls = self.shared.started.tls.is_some();
        let trusted = peer.is_some_and(|ip| rt.trusted_proxies.iter().any(|n| n.contains(&ip)));
        public_base(req, tls, trusted)
    }

    /// Places the bytes of an upload keygate handed out: the pool and project that started it,
    /// Google's own upload URL.
    pub(super) fn place_upload(
        &self,
        rt: &Runtime,
        id: String,
        up: affinity::UploadSession,
    ) -> Result<Placed, GatewayError> {
        let Some(i) = rt.pool_index(&up.owner.pool) else {
            return Err(GatewayError::new(
                503,
                "UNAVAILABLE",
                format!(
                    "keygate: pool '{}' that started this upload no longer exists",
                    up.owner.pool
                ),
            ));
        };
        Ok(Placed {
            pool: rt.pools[i].clone(),
            project: Some(up.owner.project.to_string()),
            path_and_query: Some(up.upstream_path_and_query),
            unbound: Vec::new(),
            learn: Learn::UploadContinue { id },
        })
    }
}

/// Whether answers to `method` report the tokens a call used.
pub(super) fn counts_tokens(method: &str) -> bool {
    matches!(
        method,
        "generateContent"
            | "streamGenerateContent"
            | "embedContent"
            | "batchEmbedContents"
            | "chat/completions"
            | "completions"
            | "embeddings"
    )
}

/// The value of query parameter `name`, %-decoded, if there is one.
pub(super) fn query_value(req: &RequestHeader, name: &str) -> Option<String> {
    let value = req
        .uri
        .query()?
        .split(['&', ';'])
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))?;
    Some(
        percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// Whether a successful POST to `path` may create resources Google binds to a project.
pub(super) fn creates_resources(path: &str) -> bool {
    const MARKERS: [&str; 8] = [
        "/cachedContents",
        "/batches",
        "/tunedModels",
        "/files",
        ":batchGenerateContent",
        ":asyncBatchEmbedContent",
        ":predictLongRunning",
        "/interactions",
    ];
    // Every marker starts at a `/` or `:`: one pass over the path looks for all of them there.
    let path = path.as_bytes();
    (0..path.len()).any(|i| {
        matches!(path[i], b'/' | b':')
            && MARKERS.iter().any(|m| path[i..].starts_with(m.as_bytes()))
    })
}

/// Whether `path` is the Interactions API's collection, where a POST starts an interaction
/// (a first turn, or a follow-up naming its parent in `previous_interaction_id`).
pub(super) fn creates_interaction(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    path.trim_end_matches('/').ends_with("/interactions")
}

/// `scheme://host[:port]` as the client reached keygate (`tls`: keygate's own listener speaks
/// TLS), for URLs handed back to it. A `trusted` proxy in front (TLS termination) says so with
/// `X-Forwarded-Proto` / `X-Forwarded-Host`; from anyone else those headers are ignored.
pub(super) fn public_base(req: &RequestHeader, tls: bool, trusted: bool) -> String {
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let forwarded = |name: &str| header(name).filter(|_| trusted);
    let scheme = match forwarded("x-forwarded-proto").as_deref() {
        _ if tls => "https",
        Some("https") => "https",
        _ => "http",
    };
    let host = forwarded("x-forwarded-host")
        .or_else(|| header("host"))
        .or_else(|| req.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".to_string());
    // A host header is the client's own word: keep only characters a host[:port] may hold.
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'))
        .collect();
    format!("{scheme}://{host}")
}
