fn main() -> std::process::ExitCode {
    talkline_runtime::cli::run()
}
