fn main() -> std::process::ExitCode {
    // `talkline ... | head` must end quietly, not panic on a closed stdout: restore the default
    // SIGPIPE action that Rust's runtime replaces with "ignore".
    #[cfg(unix)]
    // SAFETY: called before any thread exists; SIG_DFL is a valid action for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_the_heap_flat();
    talkline_runtime::cli::run()
}

/// Fixes glibc's mmap and trim thresholds at 128 KiB, which also turns off their dynamic
/// adjustment. By default every large block freed (a Whisper window, a Piper chunk's tensors, a
/// session's KV cache) raises the mmap threshold towards 32 MiB, after which such blocks come
/// from the heap, are fragmented by the small allocations of the many session threads, and are
/// never given back: a 2-session soak grew about 20 MiB a minute for as long as it ran. With
/// fixed thresholds large blocks are mapped and unmapped, and the resident size levels off
/// within minutes (399 -> 455 MiB over 5 minutes, flat from the third).
fn keep_the_heap_flat() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any thread exists; mallopt only sets allocator parameters.
    unsafe {
        const THRESHOLD: libc::c_int = 128 * 1024;
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
    }
}
