//! `clastor auth`: helpers for the auth file (`serve --auth-file`): make a
//! new random token, or hash one, into the `token_sha256` the file holds.

use std::io::{BufRead, Read};
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// Tools for the server's auth file (--auth-file).
#[derive(Debug, Args)]
#[command(
    long_about = "Tools for the server's auth file (`clastor serve --auth-file`). The file \
stores no token, only each token's SHA-256 in hex (`token_sha256`), so reading it gives nobody a \
credential. `new-token` makes a random token and prints it with its digest; `hash-token` prints the \
digest of a token read from standard input (not from a flag: a flag shows in `ps` and shell \
history)."
)]
pub(crate) struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Print a new random token (256 bits, hex) and, on the next line, its `token_sha256`.
    NewToken,
    /// Read a token from standard input (its first line) and print its `token_sha256`.
    HashToken,
}

/// Runs `clastor auth`.
pub(crate) fn run(args: AuthArgs) -> ExitCode {
    let result = match args.command {
        AuthCommand::NewToken => new_token().map(|token| {
            println!("{token}");
            println!("{}", clastor::server::hash_token(&token));
        }),
        AuthCommand::HashToken => read_token().map(|token| println!("{}", clastor::server::hash_token(&token))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clastor auth: {e}");
            ExitCode::FAILURE
        }
    }
}

fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn read_token() -> std::io::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let token = line.trim_end_matches(['\r', '\n']);
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no token on standard input",
        ));
    }
    Ok(token.to_owned())
}
