//! The `seaport` command; everything lives in the library's `cli` module.

/// The process allocates with jemalloc: measured on the hub's registration
/// load (10 connections × 10,000 records), it takes 35-40 % less CPU per
/// record than glibc's allocator, whose free lists a burst of frees sends
/// through consolidation (docs/performance.md, "Registration throughput").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, as its `malloc_conf` string (`_RJEM_MALLOC_CONF` in
/// the environment still overrides them): a background thread gives unused
/// pages back to the system half a second after they were freed, instead
/// of ten seconds and only when the process allocates again. Measured: a hub
/// left at 20.3-20.8 MiB instead of 23.4-23.9 after 100 connections × 100
/// records, at the same CPU per record.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf = MallocConf(
    c"background_thread:true,max_background_threads:1,dirty_decay_ms:500,muzzy_decay_ms:0".as_ptr(),
);

/// A C string pointer that may be shared: jemalloc reads it once, at start.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a string literal, which lives for the whole
// process and is never written.
#[allow(unsafe_code)]
unsafe impl Sync for MallocConf {}

fn main() -> std::process::ExitCode {
    if let Some(code) = seaport::process::factory::run_if_asked() {
        return code;
    }
    seaport::hub::allocating_with_jemalloc();
    seaport::cli::run()
}
