//! The `seaport` command; everything lives in the library's `cli` module.

/// The process allocates with jemalloc: measured on the hub's registration
/// load (10 connections × 10,000 records), it takes 35-40 % less CPU per
/// record than glibc's allocator, whose free lists a burst of frees sends
/// through consolidation (docs/performance.md, "Registration throughput").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    seaport::hub::allocating_with_jemalloc();
    seaport::cli::run()
}
