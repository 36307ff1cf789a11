//! The source tree keeps the shape the README's layout section describes: folders import each
//! other in one direction only (configuration at the bottom, the gateway and operations on
//! top), and no file grows past what a reader takes in at once.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The most lines a file under `src/` may have.
const MAX_LINES: usize = 700;

/// The parts of `src/`, bottom layer first (as `lib.rs` and the README's layout table list
/// them): each may import only parts before it.
const LAYERS: [&str; 13] = [
    "secret",
    "logging",
    "config",
    "wire",
    "quota",
    "tenants",
    "cache",
    "upstream",
    "telemetry",
    "runtime",
    "fleet",
    "gateway",
    "ops",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_files() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a source file is readable");
            let rel = p
                .strip_prefix(&src)
                .expect("under src")
                .display()
                .to_string();
            (rel, text)
        })
        .collect()
}

/// The part of the design a file belongs to: its top folder, or its own name at the root.
fn part_of(rel: &str) -> String {
    let first = rel.split('/').next().unwrap_or(rel);
    first.trim_end_matches(".rs").to_string()
}

/// Which parts each part names through `crate::`, comments left out.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in src_files() {
        let part = part_of(&rel);
        if part == "lib" || part == "main" {
            continue; // the crate root wires every part together
        }
        let entry = graph.entry(part.clone()).or_default();
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != part {
                    entry.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one, as the parts along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn folders_import_each_other_in_one_direction() {
    let graph = imports();
    assert!(graph.contains_key("config") && graph.contains_key("gateway"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between parts: {}", cycle.join(" → "));
    }
    // Configuration is the bottom layer: it uses nothing of keygate's but the secret type.
    let config: Vec<&String> = graph["config"].iter().filter(|p| *p != "secret").collect();
    assert!(config.is_empty(), "config imports {config:?}");
}

#[test]
fn each_part_imports_only_the_layers_below_it() {
    let graph = imports();
    for (part, used) in &graph {
        let Some(at) = LAYERS.iter().position(|l| l == part) else {
            panic!("src/{part} is in no layer: add it to LAYERS and the README's layout table");
        };
        let above: Vec<&String> = used
            .iter()
            .filter(|u| LAYERS.iter().position(|l| l == u).is_none_or(|i| i >= at))
            .collect();
        assert!(
            above.is_empty(),
            "{part} imports {above:?}, which are not below it"
        );
    }
}

#[test]
fn a_cycle_is_found_and_named() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

#[test]
fn no_source_file_is_over_the_limit() {
    let long: Vec<String> = src_files()
        .into_iter()
        .filter(|(_, text)| text.lines().count() > MAX_LINES)
        .map(|(rel, text)| format!("{rel}: {} lines", text.lines().count()))
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:#?}");
}
