use super::*;
use crate::secret::sha256;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("."), &|_| None)
}

const MINIMAL: &str = "pools:\n  - name: main\n    upstream: https://example.com\n    keys: [k1]\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.max_body_bytes, 20 * 1024 * 1024);
    assert_eq!(c.pools[0].upstream.port, 443);
    assert_eq!(
        c.pools[0].keys[0].project,
        c.pools[0].keys[0].secret.fingerprint()
    );
    assert!(c.summary().contains("1 keys in 1 projects"));
}

#[test]
fn client_limits_public_url_and_trusted_proxies() {
    let c = parse(MINIMAL).unwrap();
    let l = c.client_limits;
    assert_eq!(l.header_timeout, Duration::from_secs(10));
    assert_eq!(l.body_timeout, Duration::from_secs(10));
    assert_eq!(l.body_min_rate, 1024);
    assert_eq!(l.send_timeout, Duration::from_secs(60));
    assert_eq!(l.max_connections, None);
    assert_eq!(l.max_buffered_body_bytes, DEFAULT_MAX_BUFFERED_BYTES);
    assert_eq!(c.public_url, None);
    assert!(c.trusted_proxies.is_empty());
    let c = parse(&format!(
        "{MINIMAL}public_url: \"https://gw.example.com/ai/\"\ntrusted_proxies: [10.0.0.0/8, \"::1\", 192.168.1.7]\nclient_limits:\n  header_timeout_seconds: 30\n  max_connections: 50\n  body_min_rate_bytes_per_second: 0\n"
    ))
    .unwrap();
    assert_eq!(c.public_url.as_deref(), Some("https://gw.example.com/ai"));
    assert_eq!(c.trusted_proxies.len(), 3);
    assert!(c.trusted_proxies[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
    assert_eq!(c.client_limits.max_connections, Some(50));
    assert_eq!(c.client_limits.body_min_rate, 0);
    for (extra, why) in [
        (
            "client_limits:\n  header_timeout_seconds: 31\n",
            "header_timeout_seconds: must be 1 to 30",
        ),
        (
            "client_limits:\n  header_timeout_seconds: 0\n",
            "header_timeout_seconds",
        ),
        ("client_limits:\n  max_connections: 0\n", "max_connections"),
        (
            "client_limits:\n  send_timeout_seconds: 0\n",
            "send_timeout_seconds",
        ),
        (
            "client_limits:\n  body_timeout_seconds: 0\n",
            "body_timeout_seconds",
        ),
        (
            "client_limits:\n  max_buffered_body_bytes: 0\n",
            "max_buffered_body_bytes",
        ),
        (
            "client_limits:\n  header_timeout: 5\n",
            "unknown field `header_timeout`",
        ),
        (
            "public_url: \"gw.example.com\"\n",
            "must start with https://",
        ),
        ("public_url: \"https://user:pw@gw\"\n", "credentials"),
        ("public_url: \"https://gw/?x=1\"\n", "query"),
        ("public_url: \"https:///x\"\n", "no host"),
        ("trusted_proxies: [\"10.0.0.0/99\"]\n", "trusted_proxies[0]"),
        ("trusted_proxies: [\"proxy.local\"]\n", "trusted_proxies[0]"),
    ] {
        let e = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
        assert!(e.contains(why), "{extra}: {e}");
    }
}

#[test]
fn unknown_field_error_names_its_path() {
    let e = parse("pools:\n  - name: main\n    upstreem: https://x\n    keys: [k1]\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("pools[0]"), "{e}");
    assert!(e.contains("unknown field `upstreem`"), "{e}");
}

#[test]
fn a_key_in_the_wrong_place_is_not_echoed() {
    let e = parse("pools:\n  - name: main\n    upstream: https://x\n    keys: MadeUpKeyValue123\n")
        .unwrap_err()
        .to_string();
    assert!(!e.contains("MadeUpKeyValue123"), "{e}");
    assert!(e.contains("pools[0].keys"), "{e}");
    let e = parse("pools:\n  - name: main\n    upstream: https://x\n    MadeUpKeyValue123: 1\n")
        .unwrap_err()
        .to_string();
    assert!(!e.contains("MadeUpKeyValue123"), "{e}");
}

#[test]
fn keys_from_all_three_sources_with_projects() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys"),
        "# comment\nfile-key-1 proj-f\nfile-key-2   # trailing comment\n\n",
    )
    .unwrap();
    let text = "pools:\n  - name: main\n    upstream: http://127.0.0.1:9\n    keys:\n      - key: inline-1\n        project: p1\n      - inline-2\n    keys_env: KEYS\n    keys_file: keys\n";
    let c = Config::parse(text, dir.path(), &|name| {
        (name == "KEYS").then(|| "env-1, env-2:proj-e,".to_string())
    })
    .unwrap();
    let got: Vec<(&str, &str)> = c.pools[0]
        .keys
        .iter()
        .map(|k| (k.secret.expose(), k.project.as_str()))
        .collect();
    assert_eq!(got.len(), 6);
    assert_eq!(got[0], ("inline-1", "p1"));
    assert_eq!(got[3], ("env-2", "proj-e"));
    assert_eq!(got[4], ("file-key-1", "proj-f"));
    assert_eq!(got[5].0, "file-key-2");
    assert!(got[5].1.starts_with("key#"));
}

#[test]
fn empty_pool_is_an_error_naming_the_sources() {
    let e = parse("pools:\n  - name: main\n    upstream: https://x\n    keys_env: NOPE\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no keys") && e.contains("$NOPE"), "{e}");
}

#[test]
fn missing_keys_file_is_an_error_not_a_panic() {
    let e = parse(
        "pools:\n  - name: main\n    upstream: https://x\n    keys_file: /nonexistent/keys\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/keys"), "{e}");
}

#[test]
fn open_access_only_on_loopback_unless_explicit() {
    let public = format!("listen: 0.0.0.0:8080\n{MINIMAL}");
    let e = parse(&public).unwrap_err().to_string();
    assert!(e.contains("allow_unauthenticated"), "{e}");
    assert!(parse(&format!("allow_unauthenticated: true\n{public}")).is_ok());
    let with_tenant = format!("{public}tenants:\n  - name: a\n    token: t\n");
    assert!(parse(&with_tenant).is_ok());
}

#[test]
fn tenants_need_exactly_one_token_form() {
    let two = format!("{MINIMAL}tenants:\n  - name: a\n    token: t\n    token_env: X\n");
    assert!(parse(&two).is_err());
    let hashed = format!(
        "{MINIMAL}tenants:\n  - name: a\n    token_sha256: {}\n",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    let c = parse(&hashed).unwrap();
    assert_eq!(c.tenants[0].token_sha256, sha256(b"test"));
    let dup = format!(
        "{MINIMAL}tenants:\n  - name: a\n    token: dup-token-value\n  - name: b\n    token: dup-token-value\n"
    );
    let e = parse(&dup).unwrap_err().to_string();
    assert!(
        e.contains("same token") && !e.contains("dup-token-value"),
        "{e}"
    );
}

#[test]
fn pinned_upstream_addresses_are_checked() {
    let pinned = |list: &str| {
        parse(&format!("{MINIMAL}    upstream_addresses: {list}\n"))
            .map(|c| c.pools[0].upstream.addresses.clone())
    };
    let ok = pinned("[\"192.0.2.1\", \"192.0.2.2:8443\", \"[2001:db8::1]:443\", \"192.0.2.1\"]")
        .unwrap();
    let text: Vec<String> = ok.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        text,
        ["192.0.2.1:443", "192.0.2.2:8443", "[2001:db8::1]:443"],
        "bare IPs take the upstream's port; duplicates go"
    );
    for (bad, says) in [
        ("[]", "at least one address"),
        (
            "[\"example.com:443\"]",
            "[0]: \"example.com:443\" is not an IP address",
        ),
        ("[\"192.0.2.1\", \"192.0.2.999\"]", "[1]:"),
        ("[\"192.0.2.1:0\"]", "port 0"),
        ("\"192.0.2.1\"", "upstream_addresses"),
    ] {
        let e = pinned(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
        assert!(e.contains("pools[0].upstream_addresses"), "{bad}: {e}");
    }
    let e = parse(&format!(
        "{MINIMAL}    upstream_addresses: [\"192.0.2.1\"]\n    proxy: \"http://127.0.0.1:3128\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot be combined with proxy"), "{e}");
    assert!(parse(MINIMAL).unwrap().pools[0]
        .upstream
        .addresses
        .is_empty());
}

#[test]
fn upstream_health_check_interval() {
    assert_eq!(
        parse(MINIMAL).unwrap().upstream_health_check,
        Duration::from_secs(5)
    );
    let off = parse(&format!("upstream_health_check_seconds: 0\n{MINIMAL}")).unwrap();
    assert!(off.upstream_health_check.is_zero());
    assert!(parse(&format!("upstream_health_check_seconds: -1\n{MINIMAL}")).is_err());
}

#[test]
fn parses_upstreams() {
    assert_eq!(
        parse_upstream("https://generativelanguage.googleapis.com").unwrap(),
        UpstreamConfig {
            tls: true,
            host: "generativelanguage.googleapis.com".into(),
            port: 443,
            addresses: Vec::new(),
            base_path: String::new(),
            headers: Vec::new(),
        }
    );
    let u = parse_upstream("http://127.0.0.1:8081/").unwrap();
    assert_eq!(
        (u.tls, u.port, u.authority()),
        (false, 8081, "127.0.0.1:8081".into())
    );
    let v6 = parse_upstream("http://[::1]:9000").unwrap();
    assert_eq!(v6.host, "::1");
    assert_eq!(v6.authority(), "[::1]:9000");
    assert!(parse_upstream("ftp://x").is_err());
    // The API's own path is the client's to send, not the upstream's.
    let e = parse_upstream("https://x/v1beta").unwrap_err();
    assert!(e.contains("leave the API's own path out"), "{e}");
    assert!(parse_upstream("https://user:pw@x").is_err());
    assert!(parse_upstream("https://user@x/base").is_err());
    // What http::Uri would let through as "no port".
    assert!(parse_upstream("https://x:99999").is_err());
    assert!(parse_upstream("https://x:").is_err());
}

#[test]
fn redact_keeps_field_names_and_drops_values() {
    assert_eq!(
        redact("invalid type: string \"MadeUpXYZ\", expected a sequence"),
        "invalid type: string \"…\", expected a sequence"
    );
    assert_eq!(
        redact("unknown field `upstreem`, expected one of `name`, `upstream`"),
        "unknown field `upstreem`, expected one of `name`, `upstream`"
    );
    assert_eq!(redact("unknown field `MadeUpKeyX`"), "unknown field `…`");
}

#[test]
fn model_globs() {
    assert!(glob_match("gemini-2.5-pro*", "gemini-2.5-pro"));
    assert!(glob_match(
        "gemini-2.5-pro*",
        "gemini-2.5-pro-preview-05-06"
    ));
    assert!(!glob_match("gemini-2.5-pro*", "gemini-2.5-flash"));
    assert!(glob_match("*flash*", "gemini-2.0-flash-lite"));
    assert!(glob_match("gemini-?.5-*", "gemini-2.5-flash"));
    assert!(glob_match("*", ""));
    assert!(!glob_match("a*b", "a"));
    assert!(glob_match("a*b*c", "axxbyybzc"));
}

#[test]
fn fair_share_is_off_unless_a_pool_turns_it_on() {
    assert_eq!(parse(MINIMAL).unwrap().pools[0].fair_share, None);
    let on = parse(&format!("{MINIMAL}    fair_share: true\n")).unwrap();
    assert_eq!(on.pools[0].fair_share, Some(Duration::from_secs(60)));
    let short = parse(&format!(
        "{MINIMAL}    fair_share: true\n    fair_share_active_seconds: 5\n"
    ))
    .unwrap();
    assert_eq!(short.pools[0].fair_share, Some(Duration::from_secs(5)));
    for (extra, why) in [
        (
            "    fair_share_active_seconds: 5\n",
            "pools[0].fair_share_active_seconds: set without fair_share: true",
        ),
        (
            "    fair_share: true\n    fair_share_active_seconds: 0\n",
            "pools[0].fair_share_active_seconds: must be 1 to 3600",
        ),
        (
            "    fair_share: true\n    fair_share_active_seconds: 3601\n",
            "must be 1 to 3600",
        ),
    ] {
        let e = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
        assert!(e.contains(why), "{extra}: {e}");
    }
}

#[test]
fn the_cache_is_off_without_its_section_and_bounded_with_it() {
    let off = parse(MINIMAL).unwrap();
    assert!(off.cache.is_none());
    assert!(!off.pools[0].cache_shared_across_tenants);
    let on = parse(&format!(
        "{MINIMAL}    cache_shared_across_tenants: true\ncache: {{}}\n"
    ))
    .unwrap();
    let cache = on.cache.unwrap();
    assert_eq!(cache.ttl, Duration::from_secs(600));
    assert_eq!(cache.max_bytes, 256 << 20);
    assert_eq!(cache.max_entry_bytes(), 16 << 20);
    assert!(on.pools[0].cache_shared_across_tenants);
    let set = parse(&format!(
        "{MINIMAL}cache:\n  ttl_seconds: 30\n  max_megabytes: 8\n"
    ))
    .unwrap();
    assert_eq!(set.cache.unwrap().ttl, Duration::from_secs(30));
    for (extra, why) in [
        (
            "    cache_shared_across_tenants: true\n",
            "pools[0].cache_shared_across_tenants: set without a cache: section",
        ),
        (
            "cache:\n  ttl_seconds: 0\n",
            "cache.ttl_seconds: must be 1 to",
        ),
        (
            "cache:\n  max_megabytes: 0\n",
            "cache.max_megabytes: must be 1 to",
        ),
        (
            "cache:\n  max_megabytes: 99999999999\n",
            "cache.max_megabytes: must be 1 to",
        ),
        ("cache:\n  ttl: 5\n", "cache.ttl: unknown field `ttl`"),
    ] {
        let e = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
        assert!(e.contains(why), "{extra}: {e}");
    }
}

const TWO_POOLS: &str = "pools:\n  - name: pro\n    upstream: https://example.com\n    keys: [k1]\n    models: [\"gemini-2.5-pro*\"]\n  - name: flash\n    upstream: https://example.com\n    keys: [k2]\n";

#[test]
fn tenants_name_their_pools_and_limits() {
    let c = parse(&format!(
        "{TWO_POOLS}tenants:\n  - name: ci\n    token: t-ci\n    pools: [flash, pro]\n    rpm: 60\n    max_concurrent: 8\n  - name: all\n    token: t-all\n"
    ))
    .unwrap();
    assert!(c.pools[0].serves("gemini-2.5-pro"));
    assert!(!c.pools[0].serves("gemini-2.5-flash"));
    assert!(c.pools[1].serves("anything"));
    // Config order, whatever order the tenant lists them in.
    assert_eq!(c.tenants[0].pools, vec![0, 1]);
    assert_eq!(
        (c.tenants[0].rpm, c.tenants[0].max_concurrent),
        (Some(60), Some(8))
    );
    assert_eq!(c.tenants[1].pools, vec![0, 1]);
    let e = parse(&format!(
        "{TWO_POOLS}tenants:\n  - name: ci\n    token: t-ci\n    pools: [lite]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tenants[0].pools: no pool is named \"lite\""),
        "{e}"
    );
    let e = parse(&format!(
        "{TWO_POOLS}tenants:\n  - name: ci\n    token: t\n    rpm: 0\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("tenants[0].rpm"), "{e}");
}

#[test]
fn admin_token_comes_from_env_or_file_never_inline() {
    let env = |name: &str| (name == "ADM").then(|| "admin-token-0123456789".to_string());
    let yaml = format!("{MINIMAL}admin:\n  listen: 127.0.0.1:9090\n  token_env: ADM\n");
    let c = Config::parse(&yaml, Path::new("."), &env).unwrap();
    let admin = c.admin.unwrap();
    assert_eq!(admin.token_sha256, sha256(b"admin-token-0123456789"));
    assert_eq!(admin.key_check_interval, Duration::from_secs(1800));

    let inline =
        format!("{MINIMAL}admin:\n  listen: 127.0.0.1:9090\n  token: inline-secret-value-123\n");
    let e = parse(&inline).unwrap_err().to_string();
    assert!(
        e.contains("admin.token: the admin token may not be written"),
        "{e}"
    );
    assert!(!e.contains("inline-secret-value-123"), "{e}");

    let unset = format!("{MINIMAL}admin:\n  listen: 127.0.0.1:9090\n  token_env: NOPE\n");
    let e = parse(&unset).unwrap_err().to_string();
    assert!(e.contains("NOPE is not set"), "{e}");

    let same = format!("{MINIMAL}admin:\n  listen: 127.0.0.1:8080\n  token_env: ADM\n");
    let e = Config::parse(&same, Path::new("."), &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must differ from listen"), "{e}");
}

#[test]
fn a_bad_tls_file_is_a_config_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    for (cert, key) in [
        ("missing.pem".to_string(), "missing.key".to_string()),
        (junk.display().to_string(), junk.display().to_string()),
    ] {
        let yaml = format!("{MINIMAL}tls:\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n");
        let e = Config::parse(&yaml, dir.path(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tls: "), "{e}");
    }
}

#[test]
fn billing_accounts_in_all_three_spellings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys"), "file-key-1 proj-f acct-2\n").unwrap();
    let text = "pools:\n  - name: main\n    upstream: http://127.0.0.1:9\n    cap_probe_seconds: 5\n    keys:\n      - {key: inline-1, project: p1, billing_account: acct-1}\n      - {key: inline-2, project: p2}\n    keys_env: KEYS\n    keys_file: keys\n";
    let c = Config::parse(text, dir.path(), &|name| {
        (name == "KEYS").then(|| "env-1:p3:acct-1, env-2:p1:acct-1".to_string())
    })
    .unwrap();
    let got: Vec<(&str, Option<&str>)> = c.pools[0]
        .keys
        .iter()
        .map(|k| (k.project.as_str(), k.billing_account.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("p1", Some("acct-1")),
            ("p2", None),
            ("p3", Some("acct-1")),
            ("p1", Some("acct-1")),
            ("proj-f", Some("acct-2")),
        ]
    );
    assert_eq!(c.pools[0].cap_probe, Duration::from_secs(5));
    assert_eq!(
        parse(MINIMAL).unwrap().pools[0].cap_probe,
        Duration::from_secs(3600)
    );
}

#[test]
fn a_project_on_two_billing_accounts_is_an_error() {
    let text = "pools:\n  - name: main\n    upstream: https://x\n    keys:\n      - {key: k1, project: p1, billing_account: acct-1}\n      - {key: k2, project: p1, billing_account: acct-2}\n";
    let e = parse(text).unwrap_err().to_string();
    assert!(e.contains("project \"p1\""), "{e}");
    assert!(e.contains("one billing account"), "{e}");
    assert!(
        !e.contains("k1") && !e.contains("k2"),
        "no key in errors: {e}"
    );
    // Naming it on one key and not on another is the same mistake.
    let half = "pools:\n  - name: main\n    upstream: https://x\n    keys:\n      - {key: k1, project: p1, billing_account: acct-1}\n      - {key: k2, project: p1}\n";
    assert!(parse(half).is_err());
    let env_typo = Config::parse(
        "pools:\n  - name: main\n    upstream: https://x\n    keys_env: KEYS\n",
        Path::new("."),
        &|_| Some("k1:p1:acct:extra".to_string()),
    );
    assert!(env_typo
        .unwrap_err()
        .to_string()
        .contains("KEY:project:billing_account"));
    let no_project = "pools:\n  - name: main\n    upstream: https://x\n    keys:\n      - {key: k1, billing_account: acct-1}\n";
    assert!(parse(no_project).is_err());
    let zero = "pools:\n  - name: main\n    upstream: https://x\n    keys: [k1]\n    cap_probe_seconds: 0\n";
    assert!(parse(zero).is_err());
}

#[test]
fn an_upstream_may_live_under_a_base_path() {
    let cf = "https://gateway.ai.cloudflare.com/v1/acct-1/gw_2/google-ai-studio/";
    let u = parse_upstream(cf).unwrap();
    assert_eq!(u.authority(), "gateway.ai.cloudflare.com");
    assert_eq!(u.base_path, "/v1/acct-1/gw_2/google-ai-studio");
    assert_eq!(u.label(), "https://gateway.ai.cloudflare.com/…");
    assert!(u.is_relay());
    let plain = parse_upstream("http://127.0.0.1:9/").unwrap();
    assert_eq!(plain.base_path, "");
    assert!(!plain.is_relay());
    assert_eq!(plain.label(), "http://127.0.0.1:9");
    for bad in [
        "https://x/a//b",
        "https://x/a/../b",
        "https://x/./b",
        "https://x/a%2Fb",
        "https://x/a b",
        "https://x/a?b=1",
        "https://x/a#f",
        "https://x/relay/v1beta",
        "https://x/relay/upload",
    ] {
        assert!(parse_upstream(bad).is_err(), "{bad}");
    }
    // The summary (start-up log, --check) names the relay, not the account in its path.
    let summary = parse(&MINIMAL.replace("https://example.com", cf))
        .unwrap()
        .summary();
    assert!(summary.contains("gateway.ai.cloudflare.com/…"), "{summary}");
    assert!(!summary.contains("acct-1"), "{summary}");
}

#[test]
fn upstream_headers_come_from_the_environment_only() {
    let with = |headers: &str| format!("{MINIMAL}    upstream_headers: {headers}\n");
    let env = |name: &str| match name {
        "CF_AIG_TOKEN" => Some("Bearer made-up-relay-token".to_string()),
        "BAD" => Some("line\nbreak".to_string()),
        _ => None,
    };
    let c = Config::parse(
        &with("{Cf-Aig-Authorization: {env: CF_AIG_TOKEN}}"),
        Path::new("."),
        &env,
    )
    .unwrap();
    let headers = &c.pools[0].upstream.headers;
    assert_eq!(headers.len(), 1);
    assert_eq!(headers[0].0, "cf-aig-authorization");
    assert_eq!(headers[0].1.expose(), "Bearer made-up-relay-token");
    assert!(c.pools[0].upstream.is_relay());
    assert!(!format!("{c:?}").contains("made-up-relay-token"));
    for (headers, why) in [
        (
            "{cf-aig-authorization: \"Bearer inline-secret-value\"}",
            "from the environment",
        ),
        ("{cf-aig-authorization: {env: NOPE}}", "NOPE is not set"),
        (
            "{x-goog-api-key: {env: CF_AIG_TOKEN}}",
            "sets this header itself",
        ),
        (
            "{Authorization: {env: CF_AIG_TOKEN}}",
            "sets this header itself",
        ),
        ("{host: {env: CF_AIG_TOKEN}}", "sets this header itself"),
        (
            "{content-length: {env: CF_AIG_TOKEN}}",
            "sets this header itself",
        ),
        ("{\"bad name\": {env: CF_AIG_TOKEN}}", "not a header name"),
        ("{x-a: {env: BAD}}", "must hold a header value"),
        (
            "{x-a: {env: CF_AIG_TOKEN}, X-A: {env: CF_AIG_TOKEN}}",
            "twice",
        ),
        (
            "{x-a: {env: CF_AIG_TOKEN, value: v}}",
            "from the environment",
        ),
    ] {
        let e = Config::parse(&with(headers), Path::new("."), &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstream_headers") && e.contains(why),
            "{headers}: {e}"
        );
        assert!(
            !e.contains("inline-secret-value") && !e.contains("made-up-relay-token"),
            "{e}"
        );
    }
}

#[test]
fn numbered_key_variables_load_with_gaps() {
    let text = "pools:\n  - name: chat\n    upstream: https://x\n    keys_env_prefix: GOOGLE_AI_STUDIO_KEY_CHAT\n";
    let vars: Vec<(&str, &str)> = vec![
        ("GOOGLE_AI_STUDIO_KEY_CHAT", "bare-key-0:p0"),
        (
            "GOOGLE_AI_STUDIO_KEY_CHAT_1",
            "one-key-1:p1, one-key-2:p2:acct",
        ),
        ("GOOGLE_AI_STUDIO_KEY_CHAT_07", "seven-key"),
        ("GOOGLE_AI_STUDIO_KEY_CHAT_3", "three-key:p3"),
        ("GOOGLE_AI_STUDIO_KEY_CHAT_OLD", "old-key-ignored"),
        ("GOOGLE_AI_STUDIO_KEY_CHATTY_1", "other-key-ignored"),
    ];
    let names: Vec<String> = vars.iter().map(|(n, _)| n.to_string()).collect();
    let env = |name: &str| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    };
    let c = Config::parse_with_names(text, Path::new("."), &env, &names).unwrap();
    let got: Vec<&str> = c.pools[0].keys.iter().map(|k| k.secret.expose()).collect();
    assert_eq!(
        got,
        [
            "bare-key-0",
            "one-key-1",
            "one-key-2",
            "three-key",
            "seven-key"
        ]
    );
    assert_eq!(c.pools[0].keys[2].billing_account.as_deref(), Some("acct"));
    let summary = c.summary();
    assert!(
        summary.contains("keys_env_prefix GOOGLE_AI_STUDIO_KEY_CHAT: 5 keys in 4 variables"),
        "{summary}"
    );
    assert!(!summary.contains("one-key"), "{summary}");
    // Without the names, only the bare variable is read.
    let bare = Config::parse(text, Path::new("."), &env).unwrap();
    assert_eq!(bare.pools[0].keys.len(), 1);
    // Nothing found: the error names the prefix; a trailing _ is refused.
    let e = parse(text).unwrap_err().to_string();
    assert!(
        e.contains("keys_env_prefix ($GOOGLE_AI_STUDIO_KEY_CHAT"),
        "{e}"
    );
    let e = parse(&text.replace("CHAT\n", "CHAT_\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("trailing _"), "{e}");
    // A bad entry names its variable, not its value.
    let bad = |name: &str| (name == "GOOGLE_AI_STUDIO_KEY_CHAT_2").then(|| "k:p:b:extra".into());
    let names = vec!["GOOGLE_AI_STUDIO_KEY_CHAT_2".to_string()];
    let e = Config::parse_with_names(text, Path::new("."), &bad, &names)
        .unwrap_err()
        .to_string();
    assert!(e.contains("$GOOGLE_AI_STUDIO_KEY_CHAT_2, entry 1"), "{e}");
}

#[test]
fn model_aliases_must_name_a_served_model() {
    let pools = "pools:\n  - name: pro\n    upstream: https://x\n    keys: [k1]\n    models: [\"gemini-2.5-pro*\"]\n";
    let c = parse(&format!(
        "{pools}model_aliases:\n  gemini-pro-chat: gemini-2.5-pro\n  models/pro-fix: models/gemini-2.5-pro-preview\n"
    ))
    .unwrap();
    assert_eq!(c.model_aliases["gemini-pro-chat"], "gemini-2.5-pro");
    assert_eq!(c.model_aliases["pro-fix"], "gemini-2.5-pro-preview");
    assert!(c.summary().contains("2 model alias(es)"));
    for (aliases, why) in [
        ("{gemini-image: gemini-2.5-flash-image}", "no pool serves"),
        ("{a: gemini-2.5-pro, b: a}", "itself an alias"),
        ("{gemini-2.5-pro: gemini-2.5-pro}", "stand for itself"),
        ("{\"gemini/pro\": gemini-2.5-pro}", "letters, digits"),
        ("{x: \"gemini-2.5-pro:generateContent\"}", "letters, digits"),
        ("{x: \"\"}", "letters, digits"),
    ] {
        let e = parse(&format!("{pools}model_aliases: {aliases}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model_aliases.") && e.contains(why),
            "{aliases}: {e}"
        );
    }
}
