use super::*;

#[test]
fn strict_json_takes_what_every_parser_reads_alike() {
    for ok in [
        &b""[..],
        br#"{"contents":[{"parts":[{"text":"\u00e9 \"q\""}]}],"n":1.5e3,"b":true,"z":null}"#,
        br#"{"a":{"a":1},"a":2}"#,
    ] {
        assert_eq!(strict_json(ok), Ok(()), "{}", String::from_utf8_lossy(ok));
    }
    let deep = format!("{}1{}", "[".repeat(129), "]".repeat(129));
    let fine = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    assert_eq!(strict_json(fine.as_bytes()), Ok(()));
    for bad in [
        &br#"{contents:[]}"#[..],
        br#"{'contents':[]}"#,
        br#"{"a":"\U0066"}"#,
        br#"{"a":[1,],}"#,
        b"{\"a\":\"tab\there\"}",
        br#"{"a":1} {"b":2}"#,
        b"{\"a\":\"\xff\"}",
        deep.as_bytes(),
    ] {
        assert!(
            strict_json(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
    for (k, v) in headers {
        r.insert_header(k.to_string(), *v).unwrap();
    }
    r
}

#[test]
fn openai_base_url_aliases() {
    let bearer = [("authorization", "Bearer tok")];
    for (uri, want) in [
        (
            "/v1/chat/completions",
            Some("/v1beta/openai/chat/completions"),
        ),
        ("/chat/completions", Some("/v1beta/openai/chat/completions")),
        ("/v1/embeddings", Some("/v1beta/openai/embeddings")),
        ("/embeddings", Some("/v1beta/openai/embeddings")),
        ("/models", Some("/v1beta/openai/models")),
        (
            "/models/gemini-2.5-flash",
            Some("/v1beta/openai/models/gemini-2.5-flash"),
        ),
        ("/v1/models", Some("/v1beta/openai/models")),
        (
            "/v1/models/gemini-2.5-flash",
            Some("/v1beta/openai/models/gemini-2.5-flash"),
        ),
        ("/v1/models/gemini-2.5-flash:generateContent", None),
        ("/v1beta/openai/chat/completions", None),
        ("/v1/chat/completions/extra", None),
        ("/v1x/chat/completions", None),
    ] {
        assert_eq!(
            openai_alias(uri, &req("POST", uri, &bearer), false).as_deref(),
            want,
            "{uri}"
        );
    }
    // The native model listing keeps its meaning for Gemini SDKs.
    let goog = [("x-goog-api-key", "tok")];
    let alias = |path, headers: &[(&str, &str)], query_key| {
        openai_alias(path, &req("GET", path, headers), query_key)
    };
    assert_eq!(alias("/v1/models", &goog, false), None);
    assert_eq!(alias("/v1/models", &bearer, true), None);
    assert_eq!(alias("/v1/models", &[], false), None);
    assert_eq!(
        alias("/models", &goog, false).as_deref(),
        Some("/v1beta/openai/models")
    );
}

#[test]
fn routes() {
    assert_eq!(
        api_of("/v1beta/models/x:generateContent"),
        Some(Api::Gemini)
    );
    assert_eq!(api_of("/v1/models/x:generateContent"), Some(Api::Gemini));
    assert_eq!(api_of("/v1alpha/models"), Some(Api::Gemini));
    assert_eq!(api_of("/upload/v1beta/files"), Some(Api::Gemini));
    assert_eq!(api_of("/v1beta/openai/chat/completions"), Some(Api::OpenAi));
    assert_eq!(api_of("/"), None);
    assert_eq!(api_of("/v2/x"), None);
    assert_eq!(api_of("/v1beta"), None);
}

#[test]
fn models_and_methods() {
    assert_eq!(
        model_from_path("/v1beta/models/gemini-2.5-pro:generateContent"),
        Some("gemini-2.5-pro")
    );
    assert_eq!(
        model_from_path("/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
        Some("gemini-2.5-flash")
    );
    assert_eq!(
        model_from_path("/v1beta/models/gemini-2.5-pro"),
        Some("gemini-2.5-pro")
    );
    assert_eq!(
        model_from_path("/v1beta/tunedModels/abc:generateContent"),
        Some("tunedModels/abc")
    );
    assert_eq!(model_from_path("/v1beta/models"), None);
    assert_eq!(model_from_path("/v1beta/files"), None);
    assert_eq!(
        method_of("/v1beta/models/m:streamGenerateContent"),
        "streamGenerateContent"
    );
    assert_eq!(
        method_of("/v1beta/openai/chat/completions"),
        "chat/completions"
    );
}

#[test]
fn the_model_is_read_as_google_reads_it_or_refused() {
    let chat = "/v1beta/openai/chat/completions";
    let openai = |body: &str| model_of(Api::OpenAi, chat, false, body.as_bytes());
    assert_eq!(
        openai(r#"{"model":"models/gemini-2.5-flash","messages":[]}"#),
        Ok("gemini-2.5-flash".into())
    );
    assert_eq!(
        openai(r#"{"model":"gemini-2.5-flash","messages":[],"model":"gemini-2.5-pro"}"#),
        Err(ModelError::Several)
    );
    assert_eq!(
        openai(r#"{"model":"gemini-2.5-flash","\u006dodel":"gemini-2.5-pro"}"#),
        Err(ModelError::Several)
    );
    assert_eq!(openai(r#"{"model":["x"]}"#), Err(ModelError::NotString));
    assert_eq!(openai(r#"{"messages":[]}"#), Err(ModelError::Missing));
    assert_eq!(openai("not json"), Err(ModelError::NotJson));
    assert_eq!(openai(r#"["model"]"#), Err(ModelError::NotJson));
    assert_eq!(
        openai(r#"{"model":"a"} trailing"#),
        Err(ModelError::NotJson)
    );
    // Endpoints without a model in their body.
    let files = "/v1beta/openai/files";
    assert_eq!(
        model_of(Api::OpenAi, files, false, b"--multipart--"),
        Ok(String::new())
    );
    assert_eq!(
        model_of(Api::OpenAi, "/v1beta/openai/models", false, b""),
        Ok(String::new())
    );
    // Native: the path says, and a body model must agree.
    let native = "/v1beta/models/text-embedding-004:embedContent";
    let gemini = |body: &str| model_of(Api::Gemini, native, false, body.as_bytes());
    assert_eq!(gemini(r#"{"content":{}}"#), Ok("text-embedding-004".into()));
    assert_eq!(
        gemini(r#"{"model":"models/text-embedding-004","content":{}}"#),
        Ok("text-embedding-004".into())
    );
    assert_eq!(
        gemini(r#"{"model":"models/gemini-2.5-pro"}"#),
        Err(ModelError::Mismatch {
            path: "text-embedding-004".into(),
            body: "gemini-2.5-pro".into()
        })
    );
    assert_eq!(gemini("binary"), Ok("text-embedding-004".into()));
    // Creating a cache names the model in the body only.
    let caches = "/v1beta/cachedContents";
    let create = |body: &str| model_of(Api::Gemini, caches, true, body.as_bytes());
    assert_eq!(
        create(r#"{"model":"models/gemini-2.5-flash"}"#),
        Ok("gemini-2.5-flash".into())
    );
    assert_eq!(
        create(r#"{"model":"models/gemini-2.5-flash","model":"models/gemini-2.5-pro"}"#),
        Err(ModelError::Several)
    );
    assert_eq!(create("{}"), Ok(String::new()));
    assert_eq!(
        model_of(Api::Gemini, "/v1beta/files", false, b"{}"),
        Ok(String::new())
    );
}

#[test]
fn finds_the_token_in_each_form() {
    let h = |k, v| request("POST", "/v1beta/x", &[(k, v)]);
    assert_eq!(
        client_token(&h("x-goog-api-key", "t1"), None),
        Some(b"t1".to_vec())
    );
    assert_eq!(
        client_token(&h("Authorization", "Bearer t2"), None),
        Some(b"t2".to_vec())
    );
    assert_eq!(
        client_token(&h("authorization", "bearer t2"), None),
        Some(b"t2".to_vec())
    );
    assert_eq!(
        client_token(&h("X-Access-Token", "t3"), None),
        Some(b"t3".to_vec())
    );
    let q = request("GET", "/v1beta/models", &[]);
    assert_eq!(client_token(&q, Some(b"t+4")), Some(b"t+4".to_vec()));
    assert_eq!(client_token(&q, None), None);
}

#[test]
fn upstream_request_carries_no_client_credential_or_hop_header() {
    let client = request(
        "POST",
        "/v1beta/openai/chat/completions?key=tok",
        &[
            ("x-goog-api-key", "tok"),
            ("authorization", "Bearer tok"),
            ("x-access-token", "tok"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("host", "gateway.local"),
            ("content-type", "application/json"),
            ("x-goog-api-client", "genai-py"),
            ("x-http-method-override", "GET"),
            ("x-goog-user-project", "someone-else"),
            ("accept-encoding", "br, deflate"),
        ],
    );
    let query = crate::wire::path::split_query(client.uri.query());
    let path = with_query(client.uri.path(), query.forwarded.as_deref());
    assert_eq!(path, "/v1beta/openai/chat/completions");
    let fwd = Forward {
        api: Api::OpenAi,
        path_and_query: &path,
        body_len: 10,
    };
    let h1 = upstream_test();
    let req = upstream_request(&Outgoing::from_client(&client), &fwd, "POOLKEY", &h1).unwrap();
    let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
    for gone in [
        "x-goog-api-key",
        "x-access-token",
        "connection",
        "x-hop",
        "keep-alive",
        "transfer-encoding",
        "expect",
        "x-http-method-override",
        "x-goog-user-project",
    ] {
        assert!(!names.contains(&gone), "{gone} in {names:?}");
    }
    assert_eq!(req.headers["accept-encoding"], "identity");
    assert_eq!(req.headers["authorization"], "Bearer POOLKEY");
    assert_eq!(req.headers["host"], "upstream.test");
    assert_eq!(req.headers["content-length"], "10");
    assert_eq!(req.headers["x-goog-api-client"], "genai-py");

    let native = Forward {
        api: Api::Gemini,
        ..fwd
    };
    let h2 = Target { h2: true, ..h1 };
    let req = upstream_request(&Outgoing::from_client(&client), &native, "POOLKEY", &h2).unwrap();
    assert_eq!(req.headers["x-goog-api-key"], "POOLKEY");
    assert!(req.headers.get("authorization").is_none());
    assert!(req.headers.get("host").is_none());
    assert_eq!(
        req.uri.to_string(),
        "https://upstream.test/v1beta/openai/chat/completions"
    );
}

#[test]
fn a_relay_gets_its_base_path_and_its_own_headers() {
    let client = req(
        "POST",
        "/v1beta/models/gemini-2.5-pro:generateContent?alt=sse",
        &[
            ("x-goog-api-key", "tenant-token"),
            ("cf-aig-authorization", "Bearer the-client-s-own"),
            ("cf-aig-collect-log", "false"),
            ("cf-aig-cache-key", "another-tenant-s"),
            ("x-portkey-custom-host", "https://evil.example"),
        ],
    );
    let fwd = Forward {
        api: Api::Gemini,
        path_and_query: "/v1beta/models/gemini-2.5-pro:generateContent?alt=sse",
        body_len: 2,
    };
    let headers = [(
        HeaderName::from_static("cf-aig-authorization"),
        http::HeaderValue::from_static("Bearer relay-token"),
    )];
    let relay = Target {
        authority: "gateway.ai.cloudflare.com",
        tls: true,
        h2: false,
        base_path: "/v1/acct/gw/google-ai-studio",
        headers: &headers,
    };
    let out = Outgoing::from_client(&client);
    let r = upstream_request(&out, &fwd, "POOLKEY", &relay).unwrap();
    assert_eq!(
        r.uri.to_string(),
        "/v1/acct/gw/google-ai-studio/v1beta/models/gemini-2.5-pro:generateContent?alt=sse"
    );
    // The pool's header replaces the client's of the same name; the key is the pool's.
    let sent: Vec<_> = r.headers.get_all("cf-aig-authorization").iter().collect();
    assert_eq!(sent, ["Bearer relay-token"]);
    // The relay's controls are the pool's: the client's never reach it.
    for control in [
        "cf-aig-collect-log",
        "cf-aig-cache-key",
        "x-portkey-custom-host",
    ] {
        assert!(r.headers.get(control).is_none(), "{control}");
    }
    assert_eq!(r.headers["x-goog-api-key"], "POOLKEY");
    assert_eq!(r.headers["host"], "gateway.ai.cloudflare.com");
    let r = upstream_request(&out, &fwd, "POOLKEY", &Target { h2: true, ..relay }).unwrap();
    assert_eq!(
        r.uri.to_string(),
        "https://gateway.ai.cloudflare.com/v1/acct/gw/google-ai-studio/v1beta/models/gemini-2.5-pro:generateContent?alt=sse"
    );
}

#[test]
fn an_upload_url_under_the_relay_s_path_loses_it() {
    let base = "/v1/acct/gw/google-ai-studio";
    let relayed = "/v1/acct/gw/google-ai-studio/upload/v1beta/files?upload_id=x";
    assert_eq!(
        without_base(relayed, base),
        "/upload/v1beta/files?upload_id=x"
    );
    // Google's own URL (a relay that leaves it as it is) is kept; so is a mere lookalike.
    let google = "/upload/v1beta/files?upload_id=x";
    assert_eq!(without_base(google, base), google);
    let lookalike = "/v1/acct/gw/google-ai-studio2/upload/v1beta/files?upload_id=x";
    assert_eq!(without_base(lookalike, base), lookalike);
    assert_eq!(without_base(google, ""), google);
}

#[test]
fn the_client_s_own_path_is_sent_as_written_and_any_other_as_given() {
    let client = req("PATCH", "/v1beta/cachedContents/c1?updateMask=ttl", &[]);
    let out = Outgoing::from_client(&client);
    let fwd = Forward {
        api: Api::Gemini,
        path_and_query: "/v1beta/cachedContents/c1?updateMask=ttl",
        body_len: 2,
    };
    let h1 = upstream_test();
    let r = upstream_request(&out, &fwd, "POOLKEY", &h1).unwrap();
    assert_eq!(r.method, "PATCH");
    assert_eq!(r.raw_path(), b"/v1beta/cachedContents/c1?updateMask=ttl");
    assert_eq!(r.uri.query(), Some("updateMask=ttl"));
    assert_eq!(r.headers["host"], "upstream.test");
    let other = Forward {
        path_and_query: "/v1beta/cachedContents/c2",
        ..fwd
    };
    let r = upstream_request(&out, &other, "POOLKEY", &h1).unwrap();
    assert_eq!(r.raw_path(), b"/v1beta/cachedContents/c2");
    let h2 = Target { h2: true, ..h1 };
    let r = upstream_request(&out, &fwd, "POOLKEY", &h2).unwrap();
    assert_eq!(
        r.uri.to_string(),
        "https://upstream.test/v1beta/cachedContents/c1?updateMask=ttl"
    );
}

/// Google's place, over TLS and HTTP/1.1, with no base path or headers of its own.
fn upstream_test() -> Target<'static> {
    Target {
        authority: "upstream.test",
        tls: true,
        h2: false,
        base_path: "",
        headers: &[],
    }
}
