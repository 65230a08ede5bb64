//! The code's layout: no file imports another that (directly or through others) imports it
//! back, and no folder of `src/` (a stage of the data's path) imports one that imports it
//! back. Each `.rs` file under `src/` is a module; a `crate::a::b::X` or `super::…` path
//! names the longest module it starts with. A module using its own ancestors' items (a
//! child using `super::`) is not an edge; a parent using its children's items is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`a::b`) → source, for every file under `dir`.
fn modules(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            let src = std::fs::read_to_string(&path).expect("read file");
            out.insert(parts.join("::"), src);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The code a module runs: its unit tests (`#[cfg(test)]` then `mod tests`, public to
/// its crate or not) and comment lines left out.
fn code(src: &str) -> String {
    let end = src
        .match_indices("#[cfg(test)]\n")
        .find(|(at, m)| {
            let next = src[at + m.len()..].lines().next().unwrap_or("").trim();
            next.strip_suffix("mod tests {")
                .is_some_and(|vis| matches!(vis.trim(), "" | "pub" | "pub(crate)" | "pub(super)"))
        })
        .map_or(src.len(), |(at, _)| at);
    src[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after each `prefix` (`crate::`, `super::`), with `{a, b::c}` groups expanded.
fn paths_after(src: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (i, _) in src.match_indices(prefix) {
        let before = src[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &src[i + prefix.len()..];
        let head: String = rest.chars().take_while(|&c| ident(c)).collect();
        let after = &rest[head.len()..];
        if head.ends_with("::") && after.starts_with('{') {
            let inner = &after[1..after.find('}').unwrap_or(after.len())];
            for item in inner.split(',') {
                let item: String = item.trim().chars().take_while(|&c| ident(c)).collect();
                if !item.is_empty() && item != "self" {
                    out.push(format!("{head}{item}"));
                }
            }
        }
        out.push(head.trim_end_matches(':').to_string());
    }
    out
}

/// Module → the modules it imports.
fn imports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        (1..=parts.len())
            .rev()
            .map(|k| parts[..k].join("::"))
            .find(|m| mods.contains_key(m))
    };
    let mut deps = BTreeMap::new();
    for (m, src) in mods {
        let src = code(src);
        let mut named = paths_after(&src, "crate::");
        for p in paths_after(&src, "super::") {
            // `super::super::x` in `a::b::c` is `a::x`.
            let mut base: Vec<&str> = m.split("::").collect();
            base.pop();
            let mut p = p.as_str();
            while let Some(rest) = p.strip_prefix("super::") {
                base.pop();
                p = rest;
            }
            base.push(p);
            named.push(base.join("::"));
        }
        let set: &mut BTreeSet<String> = deps.entry(m.clone()).or_default();
        for t in named.iter().filter_map(|p| resolve(p)) {
            if t != *m && !m.starts_with(&format!("{t}::")) {
                set.insert(t);
            }
        }
    }
    deps
}

/// One cycle, if there is any: the modules along it, the first repeated at the end.
fn find_cycle(deps: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for t in deps.get(m).into_iter().flatten() {
            match state.get(t.as_str()) {
                Some(1) => {
                    let at = path.iter().position(|p| p == t).unwrap();
                    let mut cycle = path[at..].to_vec();
                    cycle.push(t.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(t, deps, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in deps.keys() {
        if !state.contains_key(m) {
            if let Some(c) = visit(m, deps, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mods = modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(mods.len() > 40, "found only {} modules", mods.len());
    let deps = imports(&mods);
    // The reader sees the imports it should: a `use` group, a nested module, a `super::` path.
    assert!(deps["run::trainer"].contains("features"));
    assert!(deps["source::kafka"].contains("wire::kafka"));
    assert!(deps["source::kafka"].contains("source::reader"));
    if let Some(cycle) = find_cycle(&deps) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

/// Folder → the folders it imports: each module counted as its top-level folder (or file)
/// under `src/` (`run::trainer` is `run`), a folder using itself left out.
fn folder_imports(deps: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, targets) in deps {
        let set = out.entry(top(m)).or_default();
        for t in targets {
            if top(t) != top(m) {
                set.insert(top(t));
            }
        }
    }
    out
}

#[test]
fn no_folder_imports_one_that_imports_it_back() {
    let mods = modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let folders = folder_imports(&imports(&mods));
    // The stages are there, and read downstream: the trainer uses the features, the
    // dashboard the run tables.
    assert!(folders["run"].contains("features"));
    assert!(folders["ui"].contains("run"));
    if let Some(cycle) = find_cycle(&folders) {
        panic!("import cycle between folders: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_folder_check_sees_a_loop_through_two_files_that_is_no_file_loop() {
    // a::x uses b::y and b::z uses a::w: no module loop, but a folder loop a -> b -> a.
    let mut mods = BTreeMap::new();
    mods.insert("a".to_string(), String::new());
    mods.insert("a::x".to_string(), "use crate::b::y;".to_string());
    mods.insert("a::w".to_string(), String::new());
    mods.insert("b".to_string(), String::new());
    mods.insert("b::y".to_string(), String::new());
    mods.insert("b::z".to_string(), "use crate::a::w;".to_string());
    let deps = imports(&mods);
    assert!(find_cycle(&deps).is_none());
    let folders = folder_imports(&deps);
    assert_eq!(folders["a"], BTreeSet::from(["b".to_string()]));
    let cycle = find_cycle(&folders).expect("a -> b -> a");
    assert_eq!(cycle.first(), cycle.last());
    // A folder using its own files is no loop.
    mods.insert("b::z".to_string(), "use crate::b::y;".to_string());
    assert!(find_cycle(&folder_imports(&imports(&mods))).is_none());
}

#[test]
fn the_checker_finds_a_cycle_and_ignores_a_child_using_its_parent() {
    let mut mods = BTreeMap::new();
    mods.insert("a".to_string(), "use crate::b::{x, c::y};".to_string());
    mods.insert("b".to_string(), "fn f() { crate::d::g() }".to_string());
    mods.insert("b::c".to_string(), "use super::super::a;".to_string());
    mods.insert(
        "d".to_string(),
        "// crate::a in a comment\nuse crate::z;".to_string(),
    );
    mods.insert(
        "d::e".to_string(),
        "use super::*; use crate::d::f;".to_string(),
    );
    // Unit tests are left out, whatever their visibility; other test-only code is not.
    mods.insert(
        "f".to_string(),
        "#[cfg(test)]\nmod helpers;\nuse crate::g;\n#[cfg(test)]\npub(crate) mod tests {\n    use crate::a;\n}"
            .to_string(),
    );
    mods.insert("g".to_string(), String::new());
    let deps = imports(&mods);
    assert_eq!(deps["f"], BTreeSet::from(["g".into()]));
    assert_eq!(deps["a"], BTreeSet::from(["b".into(), "b::c".into()]));
    assert!(deps["d"].is_empty());
    assert!(
        deps["d::e"].is_empty(),
        "a child using its parent is no edge"
    );
    let cycle = find_cycle(&deps).expect("a -> b::c -> a");
    assert_eq!(cycle.first(), cycle.last());
    assert!(cycle.contains(&"b::c".to_string()), "{cycle:?}");
}

/// `.ci/run`'s preflight fails, naming what is missing, where a tool the tests need is not
/// there (so a CI whose install step failed quietly cannot pass with suites skipped).
#[test]
fn the_ci_preflight_names_a_missing_tool() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    // A PATH with python3 alone: no chromium, no chromedriver.
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    let python = String::from_utf8(python.stdout).unwrap();
    std::os::unix::fs::symlink(python.trim(), bin.join("python3")).unwrap();
    let out = std::process::Command::new("/bin/bash")
        .arg(".ci/preflight")
        .current_dir(root)
        .env("PATH", &bin)
        .env("CIFAR10_MINI", tmp.path().join("nowhere"))
        .env_remove("CIFAR_DF_TANSU")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("chromium (apt-get install chromium)"), "{err}");
    assert!(err.contains("chromedriver"), "{err}");
    assert!(err.contains("nowhere"), "{err}");
    // With the machine's own PATH, a missing sample is still named.
    let out = std::process::Command::new("/bin/bash")
        .arg(".ci/preflight")
        .current_dir(root)
        .env("CIFAR10_MINI", tmp.path().join("nowhere"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nowhere") && err.contains("CIFAR10_MINI"),
        "{err}"
    );
}
