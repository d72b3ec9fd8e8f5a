//! Command-line parsing and dispatch for the `clastor` binary. Each subcommand
//! lives in its own file with its clap arguments.

mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Clastor: a distributed lock service with fencing tokens and lost-lock events.
#[derive(Debug, Parser)]
#[command(name = "clastor", version, propagate_version = true)]
#[command(long_about = "Clastor: a distributed lock service with fencing tokens and lost-lock events.\n\n\
Run `clastor serve` to start a server (in-memory backend by default). The other \
subcommands talk to a running server.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Clastor server.
    Serve(serve::ServeArgs),
}

/// Parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
    }
}
