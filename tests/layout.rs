//! Keeps the architecture of the runtime crate (`edupulse-events/src`) honest.
//!
//! The crate is layered by folder (see the comment above the `mod` declarations in its
//! `lib.rs`): `error` and `connect` at the bottom, then `event`, then `store` and `broker`, which
//! never import each other, then `delivery`, which joins them, and `read`, `write`, `setup` and
//! `__private` on top. Inside one crate the compiler enforces none of this: any module may
//! `use crate::anything`, and an import against the grain compiles until the layers have grown
//! into one knot. This test reads the sources with std only, builds the graph of module imports
//! (`crate::`, `self::` and `super::` paths, `pub use` re-exports resolved to the module that
//! defines the name) and fails, naming the file and the import, on an import cycle, on an import
//! against the layer order, or on a concrete database backend named outside its one seam
//! (`store/backend.rs` and the two drivers). A self-test runs the checker on a synthetic crate
//! with a cycle, so a checker that sees nothing cannot pass for a clean crate.

use std::collections::{BTreeMap, BTreeSet};
use std::{fs, path::Path};

/// The layers each layer may import besides itself (a layer is a module's first segment).
const LAYERS: &[(&str, &[&str])] = &[
    // The `setters!` macro: imports nothing, used by the settings structs of every layer.
    ("setters", &[]),
    // Metric names and the functions that record them: used by every layer.
    ("telemetry", &["error", "connect"]),
    ("error", &["connect"]),
    ("connect", &["error"]),
    ("event", &["error", "connect"]),
    ("store", &["event", "error", "connect", "telemetry"]),
    ("broker", &["event", "error", "connect", "telemetry"]),
    ("delivery", &["store", "broker", "event", "error", "connect", "telemetry"]),
    ("read", &["store", "event", "error", "connect", "telemetry"]),
    ("write", &["delivery", "store", "broker", "event", "setup", "error", "connect"]),
    ("setup", &["store", "broker", "event", "error", "connect"]),
    ("__private", &["event", "error"]),
    // What a service imports at once: re-exports of every layer.
    (
        "prelude",
        &[
            "setters",
            "telemetry",
            "error",
            "connect",
            "event",
            "store",
            "broker",
            "delivery",
            "read",
            "write",
            "setup",
        ],
    ),
];

/// The only files allowed to name a concrete backend.
const SEAM_FILES: &[&str] = &["store/backend.rs", "store/postgres.rs", "store/sqlite.rs"];

/// `PgBackend`, `SqliteBackend` and the backend variants of `Backend`, `Tx` and `Lease`.
fn seam_names() -> Vec<String> {
    let variants = ["Backend", "Tx", "Lease"].map(|ty| [format!("{ty}::Postgres"), format!("{ty}::Sqlite")]);
    [vec!["PgBackend".into(), "SqliteBackend".into()], variants.concat()].concat()
}

/// Module -> imported module -> the importing file and one path that makes the import.
type Graph = BTreeMap<String, BTreeMap<String, String>>;
/// `(module, name)` -> the absolute path that a `pub use` in `module` re-exports as `name`.
type Reexports = BTreeMap<(String, String), Vec<String>>;

/// Every `.rs` file of `edupulse-events/src`: (path relative to `src`, text), sorted.
fn read_sources() -> Vec<(String, String)> {
    // The suite is the workspace's root package: its manifest dir is the workspace.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("edupulse-events/src");
    let (mut out, mut dirs) = (Vec::new(), vec![root.clone()]);
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for path in entries.map(|e| e.unwrap().path()) {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
                out.push((rel, fs::read_to_string(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `store/mod.rs` -> `store`, `store/log.rs` -> `store::log`, `lib.rs` -> the empty root path.
fn module_of(file: &str) -> String {
    let stem = file.trim_end_matches(".rs");
    let stem = stem.strip_suffix("/mod").unwrap_or(stem);
    if stem == "lib" { String::new() } else { stem.replace('/', "::") }
}

fn is_ident(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Where the token at `i` ends: past a whole string or char literal, else one byte on.
fn token_end(src: &str, i: usize) -> usize {
    let b = src.as_bytes();
    let find = |from: usize, pat: &[u8]| (from..b.len()).find(|&j| b[j..].starts_with(pat));
    match b[i] {
        b'"' => {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(b.len())
        }
        b'r' if !is_ident(b, i.wrapping_sub(1)) || (b[i - 1] == b'b' && !is_ident(b, i.wrapping_sub(2))) => {
            let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                return i + 1; // an identifier, or a raw one (`r#type`)
            }
            let close = [b"\"".as_slice(), &b"#".repeat(hashes)].concat();
            find(i + 2 + hashes, &close).map_or(b.len(), |j| j + close.len())
        }
        b'\'' if b.get(i + 1) == Some(&b'\\') => find(i + 3, b"'").map_or(b.len(), |j| j + 1),
        b'\'' => match src[i + 1..].chars().next() {
            Some(c) if b.get(i + 1 + c.len_utf8()) == Some(&b'\'') => i + 2 + c.len_utf8(),
            _ => i + 1, // a lifetime
        },
        _ => i + 1,
    }
}

/// The source with its `//` and `/* */` comments (doc comments too) blanked; lines are kept.
fn strip_comments(src: &str) -> String {
    let (b, mut out, mut i) = (src.as_bytes(), Vec::with_capacity(src.len()), 0);
    while i < b.len() {
        let comment = b[i] == b'/' && matches!(b.get(i + 1), Some(b'/' | b'*'));
        let end = match b.get(i + 1) {
            Some(b'/') if comment => src[i..].find('\n').map_or(b.len(), |j| i + j),
            Some(b'*') if comment => src[i + 2..].find("*/").map_or(b.len(), |j| i + j + 4), // not nested
            _ => token_end(src, i),
        };
        out.extend(b[i..end].iter().map(|c| if comment && *c != b'\n' { b' ' } else { *c }));
        i = end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The code before the `#[cfg(test)] mod tests {…}` tail (as rustfmt lays it out).
fn without_tests(code: &str) -> &str {
    code.find("#[cfg(test)]\nmod tests {").map_or(code, |at| &code[..at])
}

/// Parses the path or use tree at `i` below `path` (`self` and `super` resolved), pushing each
/// leaf as (absolute path, name it is known by, empty for a glob); returns where the tree ends.
fn tree(b: &[u8], i: usize, mut path: Vec<String>, out: &mut Vec<(Vec<String>, String)>) -> usize {
    let skip_ws = |i: usize| (i..b.len()).find(|&j| !b[j].is_ascii_whitespace()).unwrap_or(b.len());
    let ident = |i: usize| {
        let end = (i..b.len()).find(|&j| !is_ident(b, j)).unwrap_or(b.len());
        (String::from_utf8_lossy(&b[i..end]).into_owned(), end)
    };
    let mut i = skip_ws(i);
    if b.get(i) == Some(&b'{') {
        loop {
            i = skip_ws(i + 1); // past the `{` or a `,`
            if b.get(i) != Some(&b'}') {
                i = skip_ws(tree(b, i, path.clone(), out));
            }
            if b.get(i) != Some(&b',') {
                return i + usize::from(b.get(i) == Some(&b'}'));
            }
        }
    }
    let (name, end) = ident(i);
    if name.is_empty() {
        out.push((path, String::new())); // a glob or a turbofish: the path so far
        return i;
    }
    if b[end..].starts_with(b"::") {
        match name.as_str() {
            "super" => drop(path.pop()),
            "self" => {}
            _ => path.push(name.clone()),
        }
        return tree(b, end + 2, path, out);
    }
    let alias = Some(skip_ws(end)).filter(|&k| b[k..].starts_with(b"as ")).map(|k| ident(skip_ws(k + 2)));
    if name != "self" {
        path.push(name);
    }
    let (known_as, end) = alias.unwrap_or_else(|| (path.last().cloned().unwrap_or_default(), end));
    out.push((path, known_as));
    end
}

/// Every `crate::`/`self::`/`super::` path in `code` of `module`: (offset, absolute path, name).
fn paths(code: &str, module: &str) -> Vec<(usize, Vec<String>, String)> {
    let (b, mut out, mut i) = (code.as_bytes(), Vec::new(), 0);
    let here: Vec<String> = module.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
    while i < b.len() {
        let kw = ["crate::", "self::", "super::"].into_iter().find(|kw| b[i..].starts_with(kw.as_bytes()));
        if let Some(kw) = kw.filter(|_| !is_ident(b, i.wrapping_sub(1))) {
            let (start, base) = if kw == "crate::" { (i + kw.len(), Vec::new()) } else { (i, here.clone()) };
            let mut leaves = Vec::new();
            let end = tree(b, start, base, &mut leaves);
            out.extend(leaves.into_iter().map(|(path, name)| (i, path, name)));
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Is the use tree that starts where `before` ends a `pub use` / `pub(…) use`?
fn is_pub_use(before: &str) -> bool {
    let v = before.trim_end().strip_suffix("use").map(str::trim_end).unwrap_or_default();
    let v = if v.ends_with(')') { v.rfind("pub(").map_or("", |p| &v[..p + 3]) } else { v };
    v.ends_with("pub")
}

/// The module defining `path`, following re-exports.
fn resolve(path: &[String], modules: &BTreeSet<String>, reexports: &Reexports, depth: u32) -> Option<String> {
    for k in (1..=path.len()).rev().filter(|_| depth < 8) {
        if let Some(target) = reexports.get(&(path[..k - 1].join("::"), path[k - 1].clone())) {
            return resolve(&[target.as_slice(), &path[k..]].concat(), modules, reexports, depth + 1);
        }
    }
    (1..=path.len()).rev().map(|k| path[..k].join("::")).find(|m| modules.contains(m))
}

/// The import graph of the crate made of `sources` (path relative to `src`, text).
fn analyse(sources: &[(String, String)]) -> Graph {
    let (mut reexports, mut parsed) = (Reexports::new(), Vec::new());
    for (file, text) in sources {
        let (module, code) = (module_of(file), strip_comments(text));
        let uses = paths(without_tests(&code), &module);
        for (at, path, name) in &uses {
            if !name.is_empty() && is_pub_use(&code[..*at]) {
                reexports.insert((module.clone(), name.clone()), path.clone());
            }
        }
        parsed.push((file, module, uses));
    }
    let modules: BTreeSet<String> = parsed.iter().map(|p| p.1.clone()).filter(|m| !m.is_empty()).collect();
    let mut graph = Graph::new();
    for (file, module, uses) in parsed.into_iter().filter(|p| !p.1.is_empty()) {
        let edges = graph.entry(module.clone()).or_default();
        for (_, path, _) in &uses {
            if let Some(target) = resolve(path, &modules, &reexports, 0).filter(|t| *t != module) {
                let via = || format!("edupulse-events/src/{file}: `crate::{}`", path.join("::"));
                edges.entry(target).or_insert_with(via);
            }
        }
    }
    graph
}

/// The strongly connected components of two or more modules.
fn cycles(graph: &Graph) -> BTreeSet<Vec<String>> {
    let reach = |from: &String| {
        let (mut seen, mut todo) = (BTreeSet::new(), vec![from.clone()]);
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flat_map(BTreeMap::keys) {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|m| (m, reach(m))).collect();
    let component = |m: &String| -> Vec<String> {
        reach[m].iter().filter(|w| reach.get(w).is_some_and(|r| r.contains(m))).cloned().collect()
    };
    graph.keys().map(component).filter(|c| c.len() >= 2).collect()
}

/// One entry per pair of modules importing each other and per import cycle.
fn cycle_report(graph: &Graph) -> Vec<String> {
    let edge = |a: &String, b: &String| format!("{a} -> {b} ({})", graph[a][b]);
    let mut problems = Vec::new();
    for (a, edges) in graph {
        for b in edges.keys().filter(|b| a < *b && graph[*b].contains_key(a)) {
            problems.push(format!("{a} and {b} import each other:\n    {}\n    {}", edge(a, b), edge(b, a)));
        }
    }
    for members in cycles(graph) {
        let inner =
            members.iter().flat_map(|a| graph[a].keys().filter(|b| members.contains(b)).map(|b| edge(a, b)));
        let inner = inner.collect::<Vec<_>>().join("\n    ");
        problems.push(format!("import cycle among {}:\n    {inner}", members.join(", ")));
    }
    problems
}

fn layer(module: &str) -> &str {
    module.split("::").next().unwrap_or_default()
}

#[test]
fn no_import_cycles() {
    let problems = cycle_report(&analyse(&read_sources()));
    assert!(problems.is_empty(), "edupulse-events/src has import cycles:\n{}", problems.join("\n"));
}

#[test]
fn layers_import_only_downwards() {
    let graph = analyse(&read_sources());
    let unknown: Vec<_> = graph.keys().filter(|m| !LAYERS.iter().any(|(l, _)| *l == layer(m))).collect();
    assert!(unknown.is_empty(), "modules in no known layer (add them to LAYERS): {unknown:?}");
    let mut problems = Vec::new();
    for (a, edges) in &graph {
        let allowed = LAYERS.iter().find(|(l, _)| *l == layer(a)).map_or(&[][..], |(_, allowed)| *allowed);
        for (b, via) in edges.iter().filter(|(b, _)| layer(b) != layer(a) && !allowed.contains(&layer(b))) {
            problems.push(format!("{a} -> {b} ({via}): {} may use only {allowed:?}", layer(a)));
        }
    }
    assert!(problems.is_empty(), "imports against the layer order:\n{}", problems.join("\n"));
}

#[test]
fn one_backend_seam() {
    let mut found = Vec::new();
    for (file, text) in read_sources().iter().filter(|(f, _)| !SEAM_FILES.contains(&f.as_str())) {
        let code = strip_comments(text);
        for name in &seam_names() {
            for (at, _) in code.match_indices(name) {
                if !is_ident(code.as_bytes(), at.wrapping_sub(1))
                    && !is_ident(code.as_bytes(), at + name.len())
                {
                    let line = code[..at].matches('\n').count() + 1;
                    found.push(format!("edupulse-events/src/{file}:{line}: `{name}`"));
                }
            }
        }
    }
    assert!(found.is_empty(), "a concrete backend named outside {SEAM_FILES:?}:\n{}", found.join("\n"));
}

#[test]
fn the_graph_is_not_vacuous() {
    let sources = read_sources();
    let graph = analyse(&sources);
    let edges = graph.values().map(BTreeMap::len).sum::<usize>();
    println!("edupulse-events/src: {} modules, {edges} import edges", graph.len());
    assert!(graph.len() >= 30, "only {} modules found: {:?}", graph.len(), graph.keys());
    assert!(edges >= 60, "only {edges} import edges found: {graph:#?}");
    for (a, b) in [
        ("delivery::relay::holding", "store::backend"),
        ("store::backend", "store::postgres"),
        ("store::backend", "store::sqlite"),
        ("write::aggregate", "delivery::bus"),
        ("read::projection", "event::envelope"),
        ("__private", "event::upcast"),
    ] {
        assert!(graph.get(a).is_some_and(|e| e.contains_key(b)), "expected {a} -> {b}: {:?}", graph.get(a));
    }
    let backend = sources.iter().find(|(f, _)| f == "store/backend.rs").map(|(_, text)| strip_comments(text));
    let named = backend.is_some_and(|code| seam_names().iter().any(|n| code.contains(n)));
    assert!(named, "store/backend.rs names no backend: the seam names are stale");
}

#[test]
fn the_checker_finds_a_cycle_through_a_reexport() {
    let sources = [
        ("lib.rs", "mod a;\nmod b;\npub use crate::b::{Beta, Gamma as G};\n"),
        ("a/mod.rs", "mod inner;\npub(crate) use self::inner::Alpha;\n// use crate::c::Nothing;\n"),
        ("a/inner.rs", "pub struct Alpha(crate::G, &'static str);\nconst Q: char = '\"'; // crate::c\n"),
        ("b.rs", "use crate::{a::{Alpha as A}, c};\npub struct Beta(A);\n/* crate::d */ pub struct Gamma;\n"),
        ("c.rs", "#[cfg(test)]\nmod tests {\n    use super::super::b::Beta;\n}\n"),
    ];
    let graph = analyse(&sources.map(|(file, text)| (file.to_string(), text.to_string())));
    let edges: Vec<_> = graph.iter().flat_map(|(a, e)| e.keys().map(move |b| format!("{a}->{b}"))).collect();
    assert_eq!(edges, ["a->a::inner", "a::inner->b", "b->a::inner", "b->c"]);
    assert_eq!(cycles(&graph), BTreeSet::from([vec!["a::inner".to_string(), "b".to_string()]]));
    let report = cycle_report(&graph).join("\n");
    assert!(report.contains("a::inner and b import each other"), "{report}");
    assert!(report.contains("b -> a::inner (edupulse-events/src/b.rs: `crate::a::Alpha`)"), "{report}");
}
