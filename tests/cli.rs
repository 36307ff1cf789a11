//! The `keygate` command line: `--check` answers, exit codes, and no secret in any output.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{pool_yaml, secrets_of};
use std::process::Command;

fn check(yaml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.arg("--config")
        .arg(&path)
        .arg("--check")
        .env_remove("GEMINI_API_KEYS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_valid_config_prints_a_one_line_summary_without_secrets() {
    let yaml = "pools:\n  - name: main\n    upstream: https://example.com\n    keys:\n      - key: made-up-inline-key\n        project: p1\n    keys_env: KEYS\ntenants:\n  - name: alice\n    token: made-up-token\n";
    let (code, out) = check(yaml, &[("KEYS", "made-up-env-key:p2")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("config OK"), "{out}");
    assert!(
        out.contains("2 keys in 2 projects") && out.contains("1 tenants"),
        "{out}"
    );
    for secret in ["made-up-inline-key", "made-up-env-key", "made-up-token"] {
        assert!(!out.contains(secret), "{secret} printed: {out}");
    }
}

#[test]
fn a_typo_is_reported_with_its_field_path_and_a_non_zero_exit() {
    let yaml =
        "pools:\n  - name: main\n    upstreem: https://example.com\n    keys: [made-up-key]\n";
    let (code, out) = check(yaml, &[]);
    assert_ne!(code, 0);
    assert!(out.contains("pools[0].upstreem: unknown field"), "{out}");
    assert!(!out.contains("made-up-key"), "{out}");
}

#[test]
fn a_key_in_the_wrong_place_is_not_echoed() {
    let yaml =
        "pools:\n  - name: main\n    upstream: https://example.com\n    keys: made-up-secret-key\n";
    let (code, out) = check(yaml, &[]);
    assert_ne!(code, 0);
    assert!(out.contains("pools[0].keys"), "{out}");
    assert!(!out.contains("made-up-secret-key"), "{out}");
}

#[test]
fn open_access_on_a_public_address_is_refused() {
    let yaml = "listen: 0.0.0.0:8080\npools:\n  - name: main\n    upstream: https://example.com\n    keys: [k]\n";
    let (code, out) = check(yaml, &[]);
    assert_ne!(code, 0);
    assert!(out.contains("allow_unauthenticated"), "{out}");
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["--config", "/nonexistent/keygate.yaml", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/keygate.yaml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn the_shipped_example_config_passes_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/keygate.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["--config", path, "--check"])
        .env(
            "GEMINI_API_KEYS",
            "made-up-key-1,made-up-key-2:made-up-project",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_suite_wide_log_check_knows_the_secrets_a_test_configures() {
    // Every Keygate the tests start checks, when dropped, that its log holds none of these.
    let yaml = format!(
        "{}tenants:\n  - name: t\n    token: \"tenant-token-1\"\npools:\n  - name: x\n    upstream: http://127.0.0.1:1\n    keys: [flow-key-1, k1]\n",
        pool_yaml("http://127.0.0.1:1", &[("quoted-key-1", "p1")])
    );
    let found = secrets_of(
        &yaml,
        &[
            ("GEMINI_API_KEYS", "env-key-1:proj,env-key-2"),
            ("KEYGATE_ADMIN_TOKEN", "admin-token-1"),
        ],
    );
    assert_eq!(
        found,
        [
            "admin-token-1",
            "env-key-1",
            "env-key-2",
            "flow-key-1",
            "quoted-key-1",
            "tenant-token-1"
        ]
    );
}
