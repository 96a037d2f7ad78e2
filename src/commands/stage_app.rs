//! `cvchain stage-app`: stages the Functions app folder with this binary as the handler, and
//! with `--zip` writes and checks the deployment zip (see [`crate::stage`]).

use anyhow::Context;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The folder to stage into. Run from the repository root.
    #[arg(default_value = "dist/app")]
    pub out: PathBuf,
    /// The handler binary (default: this executable).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Also write the staged folder as this deployment zip, and check it.
    #[arg(long)]
    pub zip: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe().context("cannot find this executable")?,
    };
    let layout = crate::stage::stage(Path::new("."), &args.out, &binary)?;
    println!(
        "staged {} (handler `{}`, functions: {})",
        args.out.display(),
        layout.executable,
        layout.functions.join(", ")
    );
    if let Some(zip) = &args.zip {
        let entries = crate::stage::package(&args.out, zip)?;
        println!("packaged {}:", zip.display());
        for e in &entries {
            println!("  {:o} {:>10} {}", e.mode, e.size, e.name);
        }
    }
    Ok(())
}
