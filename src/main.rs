//! The `seaport` command; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    seaport::cli::run()
}
