//! Where exec finds a command's program, checked before it runs: a name without
//! a slash is looked up in `PATH` (the one the command will get), a path with
//! one is taken relative to the command's working directory, as `execvp` does
//! after the change of directory.

use nix::unistd::{AccessFlags, access};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `execvp`'s search path when `PATH` is not set.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Why a program cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// No such file on `PATH`.
    #[error("{program:?} is not on PATH ({path})")]
    NotOnPath {
        /// The program as written.
        program: String,
        /// The search path.
        path: String,
    },
    /// A path to a file that does not exist.
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// A file that may not be executed (or a directory).
    #[error("{} is not an executable file", .0.display())]
    NotExecutable(PathBuf),
}

/// Finds `program` as exec would for a command with `PATH` set to `path`
/// (`None`: unset) and working directory `cwd`.
pub fn find(program: &str, path: Option<&OsStr>, cwd: &Path) -> Result<PathBuf, ProgramError> {
    if program.contains('/') {
        let file = cwd.join(program);
        return if !file.exists() {
            Err(ProgramError::Missing(file))
        } else if executable(&file) {
            Ok(file)
        } else {
            Err(ProgramError::NotExecutable(file))
        };
    }
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut not_executable = None;
    for dir in path.as_bytes().split(|&b| b == b':') {
        // An empty entry is the working directory, as for execvp.
        let dir = cwd.join(OsStr::from_bytes(dir));
        let file = dir.join(program);
        if executable(&file) {
            return Ok(file);
        }
        if not_executable.is_none() && file.exists() {
            not_executable = Some(file);
        }
    }
    Err(match not_executable {
        Some(file) => ProgramError::NotExecutable(file),
        None => ProgramError::NotOnPath {
            program: program.to_string(),
            path: path.to_string_lossy().into_owned(),
        },
    })
}

/// A regular file this process may execute.
fn executable(file: &Path) -> bool {
    file.is_file() && access(file, AccessFlags::X_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let file = dir.join(name);
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    #[test]
    fn names_are_looked_up_on_the_given_path_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        script(&a, "plain", 0o644);
        let run = script(&b, "plain", 0o755);
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(find("plain", Some(&path), Path::new("/")), Ok(run));
        assert_eq!(
            find("nothere", Some(&path), Path::new("/")),
            Err(ProgramError::NotOnPath {
                program: "nothere".into(),
                path: path.to_string_lossy().into_owned(),
            })
        );
        let only_a = a.as_os_str();
        assert_eq!(
            find("plain", Some(only_a), Path::new("/")),
            Err(ProgramError::NotExecutable(a.join("plain")))
        );
    }

    #[test]
    fn relative_paths_and_path_entries_start_from_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let run = script(&dir.path().join("bin"), "run", 0o755);
        assert_eq!(find("bin/run", None, dir.path()), Ok(run.clone()));
        assert_eq!(
            find("./bin/run", None, dir.path()),
            Ok(dir.path().join("./bin/run"))
        );
        assert_eq!(find("run", Some(OsStr::new("bin")), dir.path()), Ok(run));
        assert_eq!(
            find("bin/gone", None, dir.path()),
            Err(ProgramError::Missing(dir.path().join("bin/gone")))
        );
        assert_eq!(
            find("./bin", None, dir.path()),
            Err(ProgramError::NotExecutable(dir.path().join("./bin")))
        );
    }

    #[test]
    fn without_path_the_default_search_path_is_used() {
        assert!(find("sh", None, Path::new("/")).is_ok());
    }
}
