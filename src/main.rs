//! The `cvchain` binary: parses the command line and runs the command.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    cvchain::commands::Cli::parse().command.run()
}
