//! `cargo xtask layers [DIR]`: the shipper library's layering, checked from its source text
//! (`shipper/src` unless `DIR` is given).
//!
//! Two rules (issue 11; STYLE.md "Seams between stages"):
//! 1. Only `runtime/` (and the binary, `main.rs`) imports `crate::runtime`: the worker
//!    assembles the stages, the stages never call back into it.
//! 2. The top-level modules (`sources`, `buffer`, `runtime`, ...) do not import each other in a
//!    circle.
//!
//! Operation: every `.rs` file is read with its comments, string and char literals blanked
//! and its `#[cfg(test)]` items removed (a `#[cfg(test)] mod x;` removes the file `x` too);
//! each `crate::` and `super::` path left is resolved to the top-level module it names
//! (`use crate::{a::b, c}` names `a` and `c`). A module nested inline (`mod x { .. }`) is
//! taken as its file's module. It prints what it checked and every violation as
//! `file:line`, and fails (exit 1) when there is one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// One `crate::` or `super::` path that leaves its top-level module.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Import {
    /// The importing file's top-level module (`buffer` for `buffer/io.rs`).
    from: String,
    /// The top-level module the path names.
    to: String,
    file: PathBuf,
    line: usize,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let src = match args.first() {
        Some(dir) => PathBuf::from(dir),
        None => crate::root().join("shipper/src"),
    };
    let files = rust_files(&src)?;
    let (imports, read) = read_imports(&src, &files)?;
    let modules = top_modules(&src, &files);
    println!(
        "layers: {} files under {} ({read} read, the rest test-only), {} top-level modules, \
         {} imports between them",
        files.len(),
        shown(&src),
        modules.len(),
        imports.len()
    );
    let mut failures = runtime_imports(&imports);
    failures += circles(&imports, &modules);
    if failures > 0 {
        bail!("layers: {failures} violation(s)");
    }
    println!("layers: ok");
    Ok(())
}

/// `path` relative to the workspace root when it is under it.
fn shown(path: &Path) -> std::path::Display<'_> {
    path.strip_prefix(crate::root()).unwrap_or(path).display()
}

/// Rule 1: prints each import of `runtime` from outside it; returns how many.
fn runtime_imports(imports: &[Import]) -> usize {
    println!("rule 1: only runtime/ and main.rs import crate::runtime");
    let bad: Vec<&Import> = imports.iter().filter(|i| i.to == "runtime").collect();
    for i in &bad {
        println!("  FAIL {}:{}: {} imports crate::runtime", shown(&i.file), i.line, i.from);
    }
    bad.len()
}

/// Rule 2: prints the import graph and each circle in it; returns how many circles.
fn circles(imports: &[Import], modules: &BTreeSet<String>) -> usize {
    println!("rule 2: no circle among the top-level modules");
    let graph = graph(imports);
    for m in modules {
        let to: Vec<&str> = graph.get(m).into_iter().flatten().map(String::as_str).collect();
        println!("  {m} -> {{{}}}", to.join(", "));
    }
    let found = find_circles(&graph);
    for circle in &found {
        println!("  FAIL circle: {}", circle.join(" -> "));
        for pair in circle.windows(2) {
            let i = imports.iter().find(|i| i.from == pair[0] && i.to == pair[1]);
            let i = i.expect("every edge of the graph comes from an import");
            println!("    {} -> {}: {}:{}", i.from, i.to, shown(&i.file), i.line);
        }
    }
    found.len()
}

/// Each module's set of modules it imports.
fn graph(imports: &[Import]) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in imports {
        g.entry(i.from.clone()).or_default().insert(i.to.clone());
    }
    g
}

/// The circles of the graph: for every strongly connected group of two or more modules,
/// the shortest circle through each of its modules, each once, written from its first module
/// by name back to it (`["a", "b", "a"]`).
fn find_circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut circles = BTreeSet::new();
    for start in graph.keys() {
        if done.contains(start.as_str()) {
            continue;
        }
        let group: BTreeSet<&str> =
            reachable(graph, start).intersection(&reaching(graph, start)).copied().collect();
        done.extend(group.iter().copied());
        if group.len() > 1 {
            circles.extend(group.iter().map(|m| from_first(shortest_circle(graph, m, &group))));
        }
    }
    circles.into_iter().collect()
}

/// `circle` (closed: its last module is its first) rotated to start at its first module by
/// name.
fn from_first(mut circle: Vec<String>) -> Vec<String> {
    circle.pop();
    let first = circle.iter().enumerate().min_by_key(|(_, m)| *m).map_or(0, |(i, _)| i);
    circle.rotate_left(first);
    circle.push(circle[0].clone());
    circle
}

/// The modules reachable from `start` (itself included).
fn reachable<'a>(
    graph: &'a BTreeMap<String, BTreeSet<String>>,
    start: &'a str,
) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::from([start]);
    let mut todo = vec![start];
    while let Some(m) = todo.pop() {
        for next in graph.get(m).into_iter().flatten() {
            if seen.insert(next.as_str()) {
                todo.push(next.as_str());
            }
        }
    }
    seen
}

/// The modules from which `start` is reachable (itself included).
fn reaching<'a>(
    graph: &'a BTreeMap<String, BTreeSet<String>>,
    start: &'a str,
) -> BTreeSet<&'a str> {
    let mut reversed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in graph {
        for to in tos {
            reversed.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    reachable(&reversed, start).into_iter().map(|m| graph_key(graph, m)).collect()
}

/// `m` as borrowed from `graph` (every module that reaches another is one of its keys).
fn graph_key<'a>(graph: &'a BTreeMap<String, BTreeSet<String>>, m: &str) -> &'a str {
    let key = graph.keys().find(|k| k.as_str() == m);
    key.map(String::as_str).expect("a module that reaches another imports something")
}

/// The shortest path from `start` back to itself inside `group` (breadth first).
fn shortest_circle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    group: &BTreeSet<&str>,
) -> Vec<String> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    'search: while let Some(m) = queue.pop_front() {
        for next in graph.get(m).into_iter().flatten().map(String::as_str) {
            if !group.contains(next) || came_from.contains_key(next) {
                continue;
            }
            came_from.insert(next, m);
            if next == start {
                break 'search;
            }
            queue.push_back(next);
        }
    }
    let mut circle = vec![start.to_string()];
    let mut at = came_from[start];
    while at != start {
        circle.push(at.to_string());
        at = came_from[at];
    }
    circle.push(start.to_string());
    circle.reverse();
    circle
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries {
        let path = e?.path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|x| x == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The module path of `file` under `src`: `buffer/io.rs` is `[buffer, io]`, `buffer/mod.rs`
/// `[buffer]`, `lib.rs` and `main.rs` `[]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut path: Vec<String> =
        rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if matches!(path.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        path.pop();
    }
    path
}

/// The top-level modules: the first component of every file's module path.
fn top_modules(src: &Path, files: &[PathBuf]) -> BTreeSet<String> {
    files.iter().filter_map(|f| module_path(src, f).into_iter().next()).collect()
}

/// The imports between top-level modules in `files` (those left after test-only code is
/// removed), and how many files were read (the rest are test modules).
fn read_imports(src: &Path, files: &[PathBuf]) -> anyhow::Result<(Vec<Import>, usize)> {
    let modules = top_modules(src, files);
    let mut test_dirs: Vec<PathBuf> = Vec::new();
    let mut code = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let (text, test_mods) = without_tests(&blank_comments_and_literals(&text));
        test_dirs.extend(test_mods.iter().map(|m| child_dir(file).join(m)));
        code.push((file, text));
    }
    let test_only =
        |f: &Path| test_dirs.iter().any(|d| f.starts_with(d) || f == d.with_extension("rs"));
    code.retain(|(file, _)| !test_only(file));
    let mut imports = Vec::new();
    for (file, text) in &code {
        let module = module_path(src, file);
        let Some(from) = module.first() else { continue };
        for (line, to) in paths(text, &module) {
            if to != *from && modules.contains(&to) {
                let file = file.to_path_buf();
                imports.push(Import { from: from.clone(), to, file, line });
            }
        }
    }
    Ok((imports, code.len()))
}

/// Where the files of `file`'s child modules live: its own directory for `mod.rs`, `lib.rs`
/// and `main.rs`, `dir/name/` for `dir/name.rs`.
fn child_dir(file: &Path) -> PathBuf {
    let dir = file.parent().unwrap_or(Path::new("."));
    match file.file_stem().and_then(|s| s.to_str()) {
        Some("mod" | "lib" | "main") | None => dir.to_path_buf(),
        Some(stem) => dir.join(stem),
    }
}

/// `text` with comments (line, doc and block) and the contents of string and char literals
/// replaced by spaces; newlines stay, so line numbers do not change.
fn blank_comments_and_literals(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        let end = match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => line_end(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => block_comment_end(b, i),
            b'"' => string_end(b, i + 1),
            b'r' if raw_string_start(b, i).is_some() => raw_string_end(b, i),
            b'\'' => char_end(text, i).unwrap_or(i + 1),
            _ => i + 1,
        };
        if end > i + 1 {
            let keep_quotes = matches!(b[i], b'"' | b'\'' | b'r');
            let (from, to) = if keep_quotes { (i + 1, end - 1) } else { (i, end) };
            for c in &mut out[from..to] {
                if *c != b'\n' {
                    *c = b' ';
                }
            }
        }
        i = end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn line_end(b: &[u8], i: usize) -> usize {
    b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p)
}

/// The end of the (nested) block comment opening at `i`.
fn block_comment_end(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0;
    while i < b.len() {
        if b[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if b[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// Just past the closing quote of the string whose contents start at `i`.
fn string_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// The number of `#` of a raw string `r#".."#` opening at `i`.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
    (b.get(i + 1 + hashes) == Some(&b'"')).then_some(hashes)
}

fn raw_string_end(b: &[u8], i: usize) -> usize {
    let hashes = raw_string_start(b, i).unwrap_or(0);
    let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
    let body = i + 2 + hashes;
    let at = b[body..].windows(close.len()).position(|w| w == close.as_slice());
    at.map_or(b.len(), |p| body + p + close.len())
}

/// Just past a char literal opening at `i` (`'a'`, `'\''`, `'\u{1F600}'`), or `None` for a
/// lifetime or label (`'a`).
fn char_end(text: &str, i: usize) -> Option<usize> {
    let rest = text.get(i + 1..)?;
    let len = match rest.strip_prefix('\\') {
        Some(escaped) => {
            let after = 1 + escaped.chars().next()?.len_utf8();
            after + rest[after..].find('\'')?
        }
        None => rest.chars().next()?.len_utf8(),
    };
    rest[len..].starts_with('\'').then_some(i + 1 + len + 1)
}

/// `code` (already blanked) without its `#[cfg(test)]` items, and the names of the test
/// modules declared as files (`#[cfg(test)] mod tests;`).
fn without_tests(code: &str) -> (String, Vec<String>) {
    let mut out = code.as_bytes().to_vec();
    let mut files = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]").map(|p| from + p) {
        let item = at + "#[cfg(test)]".len();
        let end = item_end(code.as_bytes(), item);
        let words: Vec<&str> = code[item..end].split_whitespace().collect();
        if let ["mod", name] = words.as_slice() {
            files.push(name.trim_end_matches(';').to_string());
        } else if let ["pub" | "pub(crate)", "mod", name] = words.as_slice() {
            files.push(name.trim_end_matches(';').to_string());
        }
        for c in &mut out[at..end] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        from = end;
    }
    (String::from_utf8_lossy(&out).into_owned(), files)
}

/// Just past the item starting at `i`: its `;`, or the brace closing its first `{`.
fn item_end(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b';' if depth == 0 => return i + 1,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    b.len()
}

/// The top-level modules that the `crate::` and `super::` paths of `code` (in the module
/// `module`) name, each with its line; paths that stay inside the file's own top-level
/// module resolve to it.
fn paths(code: &str, module: &[String]) -> Vec<(usize, String)> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let rest = &code[i..];
        let starts = !ident_before(b, i);
        let (skip, base) = if starts && rest.starts_with("crate::") {
            ("crate::".len(), Some(0))
        } else if starts && rest.starts_with("super::") {
            let n = rest.as_bytes().chunks(7).take_while(|c| *c == b"super::").count();
            (n * 7, module.len().checked_sub(n))
        } else {
            i += 1;
            continue;
        };
        let line = 1 + b[..i].iter().filter(|&&c| c == b'\n').count();
        match base {
            Some(0) => {
                found.extend(first_segments(&code[i + skip..]).into_iter().map(|s| (line, s)))
            }
            Some(_) => found.push((line, module[0].clone())),
            None => {}
        }
        i += skip;
    }
    found
}

/// The first segment of the path at the start of `text`, or of each path of a group
/// (`{a::b, c}` gives `a` and `c`; `self` is skipped).
fn first_segments(text: &str) -> Vec<String> {
    let text = text.trim_start();
    let Some(group) = text.strip_prefix('{') else {
        return ident(text).into_iter().collect();
    };
    let mut depth = 0usize;
    let mut out = Vec::new();
    let mut entry_start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.extend(ident(&group[entry_start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.extend(ident(&group[entry_start..i]));
                entry_start = i + 1;
            }
            _ => {}
        }
    }
    out.retain(|s| s != "self");
    out
}

/// The identifier at the start of `text` (after white space), if any.
fn ident(text: &str) -> Option<String> {
    let text = text.trim_start();
    let end = text.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(text.len());
    (end > 0).then(|| text[..end].to_string())
}

#[cfg(test)]
mod tests;
