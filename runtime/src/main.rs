fn main() -> std::process::ExitCode {
    // `talkline ... | head` must end quietly, not panic on a closed stdout: restore the default
    // SIGPIPE action that Rust's runtime replaces with "ignore".
    #[cfg(unix)]
    // SAFETY: called before any thread exists; SIG_DFL is a valid action for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    talkline_runtime::cli::run()
}
