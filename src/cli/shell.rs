//! `clastor shell`: an interactive debug client over the binary protocol.
//!
//! The user types the text-form commands (`ACQUIRE transaction tx-1 5000`);
//! they are parsed with the protocol crate's grammar, sent as binary frames on
//! one connection, and the replies printed in the text form, so the shell
//! reads exactly like `nc host 7070` while exercising the binary path. Pushed
//! events (`!LOST …`) print as they arrive.
//!
//! On a terminal, line editing and history come from rustyline (run on its own
//! thread, since it blocks) and events are printed above the prompt through its
//! external printer. Otherwise lines are read plainly from stdin, so the shell
//! can be scripted: `printf 'PING\nHELD\n' | clastor shell`.
//!
//! Ctrl-C while a command waits (a blocked `ACQUIRE`) gives the prompt back
//! but does not forget the request: the server still runs it, so its reply is
//! printed when it comes, as `!LATE <command>` followed by the reply. A late
//! grant is shown rather than silently released, so the user knows the
//! connection holds it and can `RELEASE` it.

use std::convert::Infallible;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use clap::Args;
use clastor_client::{Client, ClientEvent, Error};
use clastor_protocol::text::{self, Command};
use rustyline::error::ReadlineError;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{ServerOpt, client_runtime};

const EXIT_CONNECTION: u8 = 3;

/// Interactive debug shell over the binary protocol.
#[derive(Debug, Args)]
#[command(long_about = "Interactive debug shell over the binary protocol.\n\n\
Type the same commands as in the text form (`nc host 7070`): PING, ACQUIRE <kind> <id> [wait_ms] \
[lease_ms], RELEASE <kind> <id>, RENEW <kind> <id> <lease_ms>, HELD [ALL], VERSION <kind>, INFO, \
HELP, QUIT. They are sent as binary frames on one connection, and replies are printed in the \
text form. Events the server pushes print as they arrive, such as `!LOST <kind> <id> token=<n> \
reason=lease_expired`, as do `!DISCONNECTED` and `!CONNECTED` when the connection drops and comes \
back (locks die with their connection). Ctrl-C while a command waits gives the prompt back; \
the server still runs the command, and its reply prints when it comes, as `!LATE <command>` \
followed by the reply (a late ACQUIRED means this connection holds the lock: RELEASE it).\n\n\
On a terminal the shell offers line editing and history (saved to --history). Otherwise it reads \
commands from stdin line by line, so it can be scripted.\n\n\
Exit status: 0 after QUIT or end of input; 3 if the server cannot be reached.\n\n\
Examples:\n  clastor shell\n  clastor shell --server 10.0.0.5:7070\n  \
printf 'ACQUIRE transaction tx-1 0 500\\nHELD\\n' | clastor shell")]
pub(crate) struct ShellArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// History file (default: ~/.clastor_history).
    #[arg(long, env = "CLASTOR_HISTORY", value_name = "PATH")]
    history: Option<PathBuf>,
    /// Keep no history file.
    #[arg(long, conflicts_with = "history")]
    no_history: bool,
    /// Read plain lines even on a terminal (no line editing).
    #[arg(long)]
    plain: bool,
}

/// `clastor shell`.
pub(crate) fn run(args: ShellArgs) -> ExitCode {
    let runtime = match client_runtime(false) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clastor: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CONNECTION);
        }
    };
    let client = match runtime.block_on(args.server.connect()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clastor: {e}");
            return ExitCode::from(EXIT_CONNECTION);
        }
    };
    let interactive = !args.plain && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let banner = match client.connection_info() {
        Some(i) => format!(
            "connected to {} ({}, connection {}). Type HELP for commands, QUIT or Ctrl-D to leave.",
            i.peer, i.server, i.connection_id
        ),
        None => format!("connected to {}.", args.server.server),
    };
    if interactive {
        let history = if args.no_history {
            None
        } else {
            args.history.clone().or_else(default_history)
        };
        match Terminal::start(&args.server.server, history) {
            Ok((terminal, printer)) => {
                println!("{banner}");
                runtime.block_on(session(client, Input::Terminal(terminal), Output::Printer(printer)));
                return ExitCode::SUCCESS;
            }
            Err(e) => eprintln!("clastor: no line editing ({e}); reading plain lines"),
        }
    }
    eprintln!("{banner}");
    let lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    runtime.block_on(session(client, Input::Plain(lines), Output::Stdout));
    ExitCode::SUCCESS
}

fn default_history() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".clastor_history"))
}

/// Where command lines come from.
enum Input {
    Terminal(Terminal),
    Plain(tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>),
}

impl Input {
    /// The next line; `None` at end of input.
    async fn next(&mut self) -> Option<String> {
        match self {
            Input::Terminal(t) => t.lines.recv().await,
            Input::Plain(lines) => match lines.next_line().await {
                Ok(line) => line,
                Err(e) => {
                    eprintln!("clastor: reading stdin: {e}");
                    None
                }
            },
        }
    }

    /// The previous line is fully answered: the prompt may come back.
    fn ready(&self) {
        if let Input::Terminal(t) = self {
            let _ = t.ready.send(());
        }
    }

    /// Ends input. After QUIT or end of input the editor thread is not
    /// reading the terminal, so it is waited for: it saves the history on its
    /// way out. After a signal it may be blocked reading a key, so it is left.
    fn finish(self, how: ShellExit) {
        if let Input::Terminal(Terminal { lines, ready, thread }) = self {
            drop((lines, ready));
            if how != ShellExit::Signal && thread.join().is_err() {
                eprintln!("clastor: the line editor thread failed");
            }
        }
    }
}

/// Why the shell stops reading: decides whether to wait for the line editor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShellExit {
    /// QUIT, or end of input.
    Quit,
    /// SIGINT outside of the line editor.
    Signal,
}

/// Where events go: above the prompt on a terminal, else straight to stdout.
enum Output {
    Printer(Box<dyn rustyline::ExternalPrinter + Send>),
    Stdout,
}

impl Output {
    fn event(&mut self, text: String) {
        match self {
            Output::Printer(p) => {
                if p.print(text).is_err() {
                    // The editor is gone (shell exiting); nothing to print to.
                }
            }
            Output::Stdout => print_flush(&text),
        }
    }
}

fn print_flush(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) is no reason to fail the session.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// A rustyline editor on its own thread. It reads one line, hands it over,
/// and waits for `ready` before prompting again, so replies print before the
/// next prompt.
struct Terminal {
    lines: mpsc::Receiver<String>,
    ready: std_mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Terminal {
    fn start(
        addr: &str,
        history: Option<PathBuf>,
    ) -> rustyline::Result<(Terminal, Box<dyn rustyline::ExternalPrinter + Send>)> {
        let mut editor = rustyline::DefaultEditor::new()?;
        let printer = editor.create_external_printer()?;
        if let Some(path) = &history {
            // A missing history file is normal on first use.
            let _ = editor.load_history(path);
        }
        let (line_tx, lines) = mpsc::channel(1);
        let (ready, ready_rx) = std_mpsc::channel();
        let prompt = format!("clastor {addr}> ");
        let thread = std::thread::Builder::new()
            .name("clastor-readline".into())
            .spawn(move || {
                loop {
                    match editor.readline(&prompt) {
                        Ok(line) => {
                            if !line.trim().is_empty() {
                                let _ = editor.add_history_entry(line.as_str());
                            }
                            if line_tx.blocking_send(line).is_err() || ready_rx.recv().is_err() {
                                break;
                            }
                        }
                        // Ctrl-C clears the line, as in a shell.
                        Err(ReadlineError::Interrupted) => {}
                        Err(ReadlineError::Eof) => break,
                        Err(e) => {
                            eprintln!("clastor: terminal: {e}");
                            break;
                        }
                    }
                }
                if let Some(path) = &history
                    && let Err(e) = editor.save_history(path)
                {
                    eprintln!("clastor: cannot save history to {}: {e}", path.display());
                }
            })
            .map_err(ReadlineError::Io)?;
        Ok((Terminal { lines, ready, thread }, Box::new(printer)))
    }
}

/// Reads commands until QUIT or end of input, printing replies and events.
async fn session(client: Client, mut input: Input, mut output: Output) {
    let mut events = client.events();
    // Commands whose wait was interrupted: their replies print when they come.
    let mut late: JoinSet<(String, Option<String>)> = JoinSet::new();
    let mut exit = ShellExit::Quit;
    loop {
        let line = tokio::select! {
            ev = events.recv() => {
                if let Some(ev) = ev {
                    output.event(format_client_event(&ev));
                }
                continue;
            }
            Some(Ok((line, reply))) = late.join_next() => {
                output.event(format_late(&line, reply.as_deref()));
                continue;
            }
            line = input.next() => line,
            // Once a Ctrl-C handler exists SIGINT no longer kills the process,
            // so honour it here (a terminal in raw mode reads it as a key instead).
            _ = tokio::signal::ctrl_c() => {
                exit = ShellExit::Signal;
                None
            }
        };
        let Some(line) = line else { break };
        let mut command = {
            let client = client.clone();
            let line = line.clone();
            tokio::spawn(async move { execute(&client, &line).await })
        };
        let reply = tokio::select! {
            reply = &mut command => reply.unwrap_or_else(|e| Some(format!("-ERR CLIENT {}\n", one_line(&e.to_string())))),
            // Events keep printing while a command (say a waiting ACQUIRE) runs.
            never = print_events(&mut events, &mut output) => match never {},
            _ = tokio::signal::ctrl_c() => {
                late.spawn(async move { (line, command.await.ok().flatten()) });
                Some("-ERR INTERRUPTED stopped waiting; the server still runs the request, its reply prints as !LATE\n".to_owned())
            }
        };
        match reply {
            Some(text) => print_flush(&text),
            None => break,
        }
        input.ready();
    }
    // Let the readline thread see the channel close and save history.
    input.finish(exit);
}

/// A reply that came after the user stopped waiting for it.
fn format_late(line: &str, reply: Option<&str>) -> String {
    let reply = reply.unwrap_or("+BYE\n");
    format!("!LATE {}\n{reply}", one_line(line.trim()))
}

/// Prints events forever; used as a `select!` arm next to a running command.
async fn print_events(events: &mut clastor_client::EventStream, output: &mut Output) -> Infallible {
    while let Some(ev) = events.recv().await {
        output.event(format_client_event(&ev));
    }
    std::future::pending().await
}

/// Runs one command line; `None` means QUIT.
async fn execute(client: &Client, line: &str) -> Option<String> {
    if line.len() > text::MAX_LINE_LEN {
        return Some(format!(
            "-ERR BAD_REQUEST line longer than {} bytes\n",
            text::MAX_LINE_LEN
        ));
    }
    let req = match text::parse(line) {
        Ok(Command::Request(req)) => req,
        Ok(Command::Help) => return Some(help()),
        Ok(Command::Quit) => return None,
        Ok(Command::Empty) => return Some(String::new()),
        Err(e) => return Some(text::format_parse_error(&e)),
    };
    Some(match client.request(req.clone()).await {
        Ok(resp) => text::format_response(&req, &resp),
        Err(e) => format_client_error(&e),
    })
}

/// The server's HELP, plus what is particular to the shell.
fn help() -> String {
    let mut help = text::format_help();
    let note = "  Ctrl-C while a command waits: stop waiting; its reply prints later as !LATE <command>, \
then the reply (a late +ACQUIRED means this connection holds the lock)\n.\n";
    match help.strip_suffix(".\n") {
        Some(body) => help = format!("{body}{note}"),
        None => help.push_str(note),
    }
    help
}

fn format_client_error(e: &Error) -> String {
    let label = match e.status() {
        Some(status) => status.name(),
        None if e.is_connection_error() => "DISCONNECTED",
        None => "CLIENT",
    };
    format!("-ERR {label} {}\n", one_line(&e.to_string()))
}

fn format_client_event(ev: &ClientEvent) -> String {
    match ev {
        ClientEvent::Server { event, .. } => text::format_event(event),
        ClientEvent::Disconnected { connection_id, error } => {
            format!(
                "!DISCONNECTED connection={connection_id} {} (its locks are gone)\n",
                one_line(&error.to_string())
            )
        }
        ClientEvent::Connected { connection_id, server } => {
            format!("!CONNECTED connection={connection_id} server={}\n", one_line(server))
        }
        ClientEvent::Lagged(n) => format!("!LAGGED {n} events were missed\n"),
        other => format!("!EVENT {}\n", one_line(&format!("{other:?}"))),
    }
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_client_side_errors_and_events() {
        assert_eq!(
            format_client_error(&Error::NotOwner("held by 3".into())),
            "-ERR NOT_OWNER lock held by another owner: held by 3\n"
        );
        assert_eq!(
            format_client_error(&Error::ConnectionLost("reset".into())),
            "-ERR DISCONNECTED connection lost: reset\n"
        );
        let ev = ClientEvent::Connected {
            connection_id: 4,
            server: "clastor\n0.1".into(),
        };
        assert_eq!(format_client_event(&ev), "!CONNECTED connection=4 server=clastor 0.1\n");
        assert_eq!(
            format_late(
                "ACQUIRE k i 5000 ",
                Some("+ACQUIRED k i token=3 version=v1 lease_ms=0\n")
            ),
            "!LATE ACQUIRE k i 5000\n+ACQUIRED k i token=3 version=v1 lease_ms=0\n"
        );
        let help = help();
        assert!(help.ends_with(" holds the lock)\n.\n"), "{help}");
        assert!(help.contains("!LATE"), "{help}");
    }
}
