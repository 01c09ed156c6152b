//! Our npm semver rules against the real npm `semver` package, case by case.

use crate::harness::node_ready;
use seaport::registry::npm_semver::satisfies;
use std::process::Command;

#[test]
fn every_case_agrees_with_npm_semver() {
    let dir = node_ready();
    let cases_path = dir.join("semver-cases.json");
    let cases: Vec<(String, String)> =
        serde_json::from_str(&std::fs::read_to_string(&cases_path).expect("read cases"))
            .expect("cases are [version, range] pairs");
    assert!(
        cases.len() >= 150,
        "the case table shrank to {}",
        cases.len()
    );
    let out = Command::new("node")
        .arg(dir.join("semver.js"))
        .arg(&cases_path)
        .current_dir(dir)
        .output()
        .expect("run node semver.js");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let npm: Vec<bool> = serde_json::from_slice(&out.stdout).expect("a JSON array of booleans");
    assert_eq!(npm.len(), cases.len());
    let disagreements: Vec<String> = cases
        .iter()
        .zip(&npm)
        .filter(|((v, r), expected)| satisfies(v, r) != **expected)
        .map(|((v, r), expected)| format!("satisfies({v:?}, {r:?}): npm says {expected}"))
        .collect();
    assert!(disagreements.is_empty(), "{disagreements:#?}");
    // Both answers occur, so the comparison means something.
    assert!(npm.iter().any(|b| *b) && npm.iter().any(|b| !*b));
}
