//! The example services: `services.d` (run from the checkout) and the copies the
//! Debian package installs under /usr/share/seaport, which must stay the same
//! services with `cwd` pointing at the installed example files.

use crate::harness::seaport;
use serde_json::Value;
use std::path::{Path, PathBuf};

const INSTALLED: &str = "/usr/share/seaport/";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A service file as JSON, whichever its format.
fn read(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read a service file");
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text).expect("JSON service file"),
        _ => {
            let table: toml::Table = toml::from_str(&text).expect("TOML service file");
            serde_json::to_value(table).expect("TOML as JSON")
        }
    }
}

fn service_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read a services directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `seaport supervise --check DIR` passes.
fn assert_check_passes(dir: &Path) {
    let out = seaport(&["supervise", "--check", &dir.to_string_lossy()])
        .output()
        .expect("run seaport");
    assert!(
        out.status.success(),
        "{}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn both_example_directories_pass_the_check() {
    assert_check_passes(&root().join("services.d"));
    // The packaged files name the installed examples, which --check looks
    // for: check them with the installed paths pointing into the checkout.
    let copy = tempfile::tempdir().expect("temp dir");
    let packaged = root().join("packaging/share/services.d");
    let checkout = format!("{}/", root().display());
    for name in service_files(&packaged) {
        let text = std::fs::read_to_string(packaged.join(&name)).expect("read");
        std::fs::write(copy.path().join(&name), text.replace(INSTALLED, &checkout)).expect("write");
    }
    assert_check_passes(copy.path());
}

#[test]
fn packaged_examples_are_the_checkout_examples_with_installed_paths() {
    let checkout = root().join("services.d");
    let packaged = root().join("packaging/share/services.d");
    assert_eq!(service_files(&checkout), service_files(&packaged));
    for name in service_files(&checkout) {
        let mut ours = read(&checkout.join(&name));
        let mut theirs = read(&packaged.join(&name));
        let relative = ours["cwd"].take();
        let absolute = theirs["cwd"].take();
        assert_eq!(ours, theirs, "{name}: differs apart from cwd");
        // "../examples/www" from services.d is examples/www in the checkout, and
        // installed as /usr/share/seaport/examples/www.
        let relative = relative.as_str().expect("cwd in the checkout's file");
        let absolute = absolute.as_str().expect("cwd in the packaged file");
        let in_checkout = relative
            .strip_prefix("../")
            .expect("cwd relative to services.d");
        assert_eq!(absolute, format!("{INSTALLED}{in_checkout}"), "{name}");
        assert!(root().join(in_checkout).is_dir(), "{name}: {relative}");
    }
}

#[test]
fn the_systemd_unit_delegates_its_cgroup_and_verifies() {
    let unit = std::fs::read_to_string(root().join("packaging/systemd/seaport.service"))
        .expect("read the unit");
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(settings.contains(&"Delegate=yes"), "{unit}");
    // It would make the delegated cgroup read-only.
    assert!(
        !settings
            .iter()
            .any(|l| l.starts_with("ProtectControlGroups=")),
        "{unit}"
    );
    // `systemd-analyze verify` wants the binary it names to exist.
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("seaport.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/seaport", crate::harness::seaport_bin()),
    )
    .expect("write the copy");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("this test needs systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
