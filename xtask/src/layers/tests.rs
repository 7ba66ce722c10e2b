//! The layering check on small fixed inputs.

use super::*;

#[test]
fn comments_and_literals_are_blanked_and_lines_kept() {
    let text = "use crate::a; // crate::b\n/* crate::c\n /* nested */ crate::d */\n\
                let s = \"crate::e \\\" crate::f\"; let c = '\"'; let r = r#\"crate::g\"#;\n\
                fn f<'a>(x: &'a str) { crate::h::x(); }\n";
    let code = blank_comments_and_literals(text);
    assert_eq!(code.lines().count(), text.lines().count());
    let found: Vec<(usize, String)> = paths(&code, &["m".to_string()]);
    assert_eq!(found, [(1, "a".to_string()), (5, "h".to_string())]);
}

#[test]
fn cfg_test_items_are_removed_and_test_module_files_named() {
    let code = "use crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n\
                #[cfg(test)]\nmod more;\n#[cfg(test)]\nuse crate::c;\nuse crate::d;\n";
    let (code, files) = without_tests(code);
    assert_eq!(files, ["more"]);
    let found: Vec<String> = paths(&code, &["m".to_string()]).into_iter().map(|p| p.1).collect();
    assert_eq!(found, ["a", "d"]);
}

#[test]
fn groups_and_super_paths_resolve_to_top_level_modules() {
    let m = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let code = "use crate::{runtime::core::Core, buffer::{self, io}, self};\n\
                use super::super::metrics::x;\nuse super::y;\nlet v = a_crate::z;\n";
    // In sinks/receiver/mod.rs, super::super is the crate root; super is sinks.
    let found = paths(code, &m(&["sinks", "receiver"]));
    let want = [(1, "runtime"), (1, "buffer"), (2, "metrics"), (3, "sinks")];
    assert_eq!(found, want.map(|(l, s)| (l, s.to_string())));
    // In sinks/receiver/batch.rs both stay inside sinks.
    let found = paths(code, &m(&["sinks", "receiver", "batch"]));
    let want = [(1, "runtime"), (1, "buffer"), (2, "sinks"), (3, "sinks")];
    assert_eq!(found, want.map(|(l, s)| (l, s.to_string())));
}

fn graph_of(edges: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, b) in edges {
        g.entry(a.to_string()).or_default().insert(b.to_string());
    }
    g
}

#[test]
fn the_shortest_circle_through_each_module_of_a_circle_once() {
    let edges = [("a", "b"), ("b", "c"), ("c", "a"), ("b", "a"), ("c", "d"), ("d", "e")];
    let g = graph_of(&[edges.as_slice(), &[("e", "d"), ("x", "a")]].concat());
    let want = [vec!["a", "b", "a"], vec!["a", "b", "c", "a"], vec!["d", "e", "d"]];
    assert_eq!(find_circles(&g), want);
    let acyclic = graph_of(&[("a", "b"), ("b", "c"), ("a", "c")]);
    assert!(find_circles(&acyclic).is_empty());
}

#[test]
fn a_small_tree_with_a_runtime_import_and_a_circle() {
    let src = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
    let files = [
        ("lib.rs", "pub mod buffer;\npub mod runtime;\npub mod sinks;\n"),
        ("main.rs", "use shipper::runtime;\n"),
        ("buffer/mod.rs", "//! crate::sinks\n\nuse crate::runtime::Core;\n#[cfg(test)]\nmod t;\n"),
        ("buffer/t/mod.rs", "use crate::sinks::x;\n"),
        ("runtime/mod.rs", "use crate::{buffer, sinks::Out};\n"),
        ("sinks/mod.rs", "pub fn f() {}\n"),
    ];
    for (path, text) in files {
        let path = src.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let all = rust_files(&src).unwrap();
    let (imports, read) = read_imports(&src, &all).unwrap();
    let modules = top_modules(&src, &all);
    std::fs::remove_dir_all(&src).unwrap();
    assert_eq!((all.len(), read), (6, 5));
    assert_eq!(modules, ["buffer", "runtime", "sinks"].map(String::from).into());
    let edges: Vec<(&str, &str, usize)> =
        imports.iter().map(|i| (i.from.as_str(), i.to.as_str(), i.line)).collect();
    let want = [("buffer", "runtime", 3), ("runtime", "buffer", 1), ("runtime", "sinks", 1)];
    assert_eq!(edges, want);
    assert_eq!(imports[0].file, src.join("buffer/mod.rs"));
    assert_eq!(runtime_imports(&imports), 1);
    assert_eq!(circles(&imports, &modules), 1);
}
