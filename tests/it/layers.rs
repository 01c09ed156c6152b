//! The source tree's layers: no module imports one above it, and the hub and
//! the client, side by side, do not import each other. The layers are the ones
//! `src/lib.rs` lists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module and its rank: a module may use only lower ranks (and
/// itself). `human` and `console` are leaves every layer may use.
const LAYERS: &[(&str, u8)] = &[
    ("human", 0),
    ("console", 0),
    ("protocol", 1),
    ("registry", 2),
    ("transport", 3),
    ("hub", 4),
    ("client", 4),
    ("process", 5),
    ("router", 5),
    ("supervise", 6),
    ("admin", 7),
    ("cli", 8),
];

fn rank(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// Every `.rs` file below `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names as `crate::NAME`.
fn uses(text: &str) -> BTreeSet<String> {
    text.match_indices("crate::")
        .map(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn no_module_uses_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("below src");
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|c| c.trim_end_matches(".rs"))
            .unwrap_or_default();
        let Some(own) = rank(top) else {
            // lib.rs and main.rs stand above every layer.
            assert!(
                ["lib", "main"].contains(&top),
                "{} is in no layer: add it to LAYERS and to the map in lib.rs",
                relative.display()
            );
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        for used in uses(&text) {
            if used == top {
                continue;
            }
            match rank(&used) {
                Some(theirs) if theirs < own => {}
                _ => wrong.push(format!("{} uses crate::{used}", relative.display())),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that go up or sideways: {wrong:#?}"
    );
}

#[test]
fn lib_rs_maps_every_layer() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read lib.rs");
    for (module, _) in LAYERS {
        assert!(
            lib.contains(&format!("pub mod {module};")) && lib.contains(&format!("[`{module}`]")),
            "lib.rs does not declare and describe {module}"
        );
    }
}
