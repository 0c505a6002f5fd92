//! How the aggregator asks glibc's malloc to hand large blocks back.
//!
//! glibc raises its mmap threshold to the size of each large block that is
//! freed (up to 32 MiB). The aggregation allocates and frees large blocks
//! all the time (the S3 readers' windows, 256 KiB–16 MiB each; the upload
//! parts), so after the first few frees they are carved from the heap, and
//! what is freed there stays resident: the peak RSS of a worker grew with
//! the clients (272–279 MB for 8–16 updates of 100 MB, one shard, on the
//! emulators). With the threshold fixed at glibc's own default, every large
//! block is its own mapping and goes back to the kernel when freed: 163–177
//! MB for the same rounds, and no slower within the emulators' timing
//! (`fedstep bench round --mode deployed`, issue #14's note).
//!
//! The Lambda package is built for glibc (`x86_64-unknown-linux-gnu`), so
//! this is what runs there; other targets keep their allocator's defaults.

/// Large blocks (≥ 128 KiB) are mapped on their own and unmapped when
/// freed, whatever was freed before.
const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

/// Fixes glibc's mmap threshold, unless the operator set one through
/// `MALLOC_MMAP_THRESHOLD_` (glibc reads it at start; it wins). Call it first
/// thing in `main`, before any thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // libc::mallopt: one allocator parameter
pub fn return_large_blocks_to_the_os() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    // SAFETY: mallopt only stores an allocator tuning parameter; it takes
    // no pointers, and is called before any other thread could allocate.
    let accepted = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
    if accepted != 1 {
        tracing::warn!("glibc refused M_MMAP_THRESHOLD; large blocks may stay resident");
    }
}

/// Other allocators: nothing to fix.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_large_blocks_to_the_os() {}
