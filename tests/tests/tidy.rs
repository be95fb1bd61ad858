//! Tidy: every Rust source file opens with a `//!` line saying what it owns, and the
//! design's rules stay true: only the plugin module names wasmtime or the generated
//! bindings; the host reads nothing under `plugins/`; the guest SDK and the plugins
//! never depend on the host; no import cycle between the host's top-level modules;
//! `unsafe` only where it is allowed by name. (Test code, in `tests.rs` files and
//! after a file's `#[cfg(test)]`, is exempt from the host rules.) And the tests keep
//! their shape: one helper builds plugins, few test binaries.
//!
//! A test binary of its own, beside the end-to-end binary (`tests/e2e/`): it reads the
//! source tree and starts nothing, so it links neither the host nor wasmtime and
//! `cargo test -p roomcast-tests --test tidy` answers in a second.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && name != "node_modules" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_says_what_it_owns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["host", "guest-sdk", "tests", "bench", "plugins"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 30, "found only {} files", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|path| path.strip_prefix(&root).unwrap_or(path).display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a `//!` opening line: {missing:#?}");
}

/// The host's source files with their text, comments and test code left out, keyed
/// by their path under `host/src`.
fn host_code() -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .filter(|path| path.file_name().is_none_or(|name| name != "tests.rs"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: Vec<&str> =
                text.lines().map(|line| line.split("//").next().unwrap_or_default()).collect();
            (path.strip_prefix(&src).unwrap_or(&path).to_path_buf(), code.join("\n"))
        })
        .collect()
}

/// The top-level module a file under `host/src` belongs to.
fn top_module(path: &Path) -> String {
    let first = path.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
    first.unwrap_or_default().trim_end_matches(".rs").to_owned()
}

/// The crate's top-level modules that `code` names (`crate::name`, also inside a
/// `use crate::{a::…, b}` group).
fn crate_refs(code: &str) -> Vec<String> {
    let ident =
        |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut refs = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Names at the group's first level: after `{` and after each `,` at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        refs.push(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            refs.push(ident(rest));
        }
    }
    refs
}

#[test]
fn only_the_plugin_module_names_wasmtime() {
    let offenders: Vec<String> = host_code()
        .into_iter()
        .filter(|(path, code)| {
            top_module(path) != "plugin" && (code.contains("wasmtime") || code.contains("bindings::"))
        })
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "wasmtime or the generated bindings named outside plugin/: {offenders:?}");
}

#[test]
fn the_host_reads_nothing_under_plugins() {
    let offenders: Vec<String> = host_code()
        .into_iter()
        .filter(|(_, code)| {
            code.contains("plugins/") && (code.contains("include_") || code.contains("\"../"))
        })
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "host code that reads the example plugins: {offenders:?}");
}

#[test]
fn guest_sdk_and_plugins_never_depend_on_the_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut manifests = vec![root.join("guest-sdk/Cargo.toml"), root.join("plugins/Cargo.toml")];
    for entry in std::fs::read_dir(root.join("plugins")).expect("plugins folder").flatten() {
        let manifest = entry.path().join("Cargo.toml");
        if manifest.is_file() {
            manifests.push(manifest);
        }
    }
    assert!(manifests.len() > 3, "found only {manifests:?}");
    for manifest in manifests {
        let text = std::fs::read_to_string(&manifest).unwrap_or_default();
        for line in text.lines() {
            let line = line.trim();
            let depends = line.starts_with("roomcast ") || line.starts_with("roomcast=");
            assert!(
                !depends && !line.contains("/host\"") && !line.contains("\"../host"),
                "{} depends on the host: {line}",
                manifest.display()
            );
        }
    }
}

#[test]
fn no_import_cycle_between_the_hosts_top_level_modules() {
    let mut edges: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for (path, code) in host_code() {
        let from = top_module(&path);
        let to = edges.entry(from.clone()).or_default();
        for name in crate_refs(&code) {
            if name != from && !name.is_empty() {
                to.insert(name);
            }
        }
    }
    assert!(edges.len() > 10, "found only {:?}", edges.keys());
    // A depth-first search that reports the first cycle it closes.
    fn visit(
        node: &str,
        edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node.to_owned()) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = Default::default();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle between top-level modules: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn unsafe_code_is_allowed_in_named_places_only() {
    let allowed = ["main.rs", "plugin/runtime.rs", "plugin/bindings.rs", "server/sockopt.rs"];
    for (path, code) in host_code() {
        if code.contains("unsafe_code") || code.contains("unsafe {") {
            assert!(allowed.iter().any(|a| path == Path::new(a)), "unsafe code in {}", path.display());
        }
    }
}

/// Tests build plugins through one helper, `tests/plugin-build`: no other file runs a
/// nested cargo.
#[test]
fn one_helper_builds_plugins_for_the_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let helper = Path::new("tests/plugin-build/src/lib.rs");
    let this = Path::new("tests/tests/tidy.rs");
    let mut files = Vec::new();
    for dir in ["host", "guest-sdk", "tests", "bench"] {
        rust_files(&root.join(dir), &mut files);
    }
    let runs_cargo = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.contains("var(\"CARGO\")") || text.contains("Command::new(\"cargo\")")
    };
    assert!(runs_cargo(&root.join(helper)), "{} no longer runs cargo", helper.display());
    let others: Vec<String> = files
        .iter()
        .map(|path| path.strip_prefix(&root).unwrap_or(path))
        .filter(|path| *path != helper && *path != this && runs_cargo(&root.join(path)))
        .map(|path| path.display().to_string())
        .collect();
    assert!(others.is_empty(), "build plugins through {} instead: {others:#?}", helper.display());
}

/// Few test binaries, since each one that runs a server links wasmtime: the end-to-end
/// tests are modules of `tests/tests/e2e/`, the tests of the `roomcast` executable
/// modules of `host/tests/binary/`.
#[test]
fn end_to_end_tests_are_modules_of_few_binaries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (dir, allowed) in [
        ("tests/tests", &["e2e", "tidy.rs"][..]),
        ("host/tests", &["binary", "fuzz.rs", "fuzz.proptest-regressions"][..]),
    ] {
        let mut entries: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        let extra: Vec<&String> = entries.iter().filter(|name| !allowed.contains(&name.as_str())).collect();
        assert!(
            extra.is_empty(),
            "{dir}: {extra:?} would be test binaries of their own; add modules to {allowed:?}"
        );
    }
}
