//! The `clastor` command-line tool: the server and the client-side commands.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
