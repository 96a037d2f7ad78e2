//! The `cvchain` binary: parses the command line and runs the command.

/// A failed command prints its error and the causes after it on one line, and no backtrace even
/// under `RUST_BACKTRACE=1`: what went wrong is a setting or an input to fix, not a place in the
/// code.
fn main() -> std::process::ExitCode {
    match cvchain::commands::Cli::from_env().command.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
