//! Command-line parsing and dispatch for the `clastor` binary. Each subcommand
//! lives in its own file with its clap arguments.

mod auth;
mod healthcheck;
mod load;
mod lock;
mod oneshot;
mod rotate;
mod serve;
mod shell;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Clastor: a distributed lock service with fencing tokens and lost-lock events.
#[derive(Debug, Parser)]
#[command(name = "clastor", version, propagate_version = true)]
#[command(
    long_about = "Clastor: a distributed lock service with fencing tokens and lost-lock events.\n\n\
Run `clastor serve` to start a server (in-memory backend by default). The other \
subcommands talk to a running server."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    // Boxed: the server's flags (every backend's) are by far the largest.
    Serve(Box<serve::ServeArgs>),
    Load(Box<load::LoadArgs>),
    // The client-side subcommands take their help (short and long, with
    // examples and exit codes) from their argument structs; a doc comment
    // here would replace it.
    Shell(shell::ShellArgs),
    Lock(lock::LockArgs),
    Ping(oneshot::PingArgs),
    Acquire(oneshot::AcquireArgs),
    Release(oneshot::ReleaseArgs),
    Held(oneshot::HeldArgs),
    Version(oneshot::VersionArgs),
    Info(oneshot::InfoArgs),
    Rotate(rotate::RotateArgs),
    Healthcheck(healthcheck::HealthcheckArgs),
    Auth(auth::AuthArgs),
}

/// Parses the command line and runs the subcommand.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Load(args) => load::run(*args),
        Command::Shell(args) => shell::run(args),
        Command::Lock(args) => lock::run(args),
        Command::Ping(args) => oneshot::ping(args),
        Command::Acquire(args) => oneshot::acquire(args),
        Command::Release(args) => oneshot::release(args),
        Command::Held(args) => oneshot::held(args),
        Command::Version(args) => oneshot::version(args),
        Command::Info(args) => oneshot::info(args),
        Command::Rotate(args) => rotate::run(args),
        Command::Healthcheck(args) => healthcheck::run(args),
        Command::Auth(args) => auth::run(args),
    }
}

/// Where the client-side subcommands find the server.
#[derive(Debug, Clone, Args)]
struct ServerOpt {
    /// Server address.
    #[arg(
        long,
        short = 's',
        env = "CLASTOR_SERVER",
        default_value = "127.0.0.1:7070",
        value_name = "HOST:PORT"
    )]
    server: String,
    /// Give up connecting after this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    #[command(flatten)]
    security: SecurityOpt,
}

/// How a client-side subcommand proves who it is and speaks TLS.
#[derive(Debug, Clone, Default, Args)]
struct SecurityOpt {
    /// Authenticate with this token (a server started with --auth-file). Prefer the
    /// environment variable: a flag's value shows in `ps`.
    #[arg(long, env = "CLASTOR_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Speak TLS, trusting the CA certificate(s) in this PEM file (a server started with
    /// --tls-cert).
    #[arg(long, env = "CLASTOR_TLS_CA", value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
    /// Present this client certificate chain (PEM) to a server that requires one
    /// (--tls-client-ca); needs --tls-ca and --tls-key.
    #[arg(long, env = "CLASTOR_TLS_CLIENT_CERT", value_name = "PEM", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "CLASTOR_TLS_CLIENT_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry [default: the host of --server].
    #[arg(long, env = "CLASTOR_TLS_SERVER_NAME", value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl SecurityOpt {
    /// `builder` with the token and TLS settings these flags give.
    fn apply(
        &self,
        builder: clastor_client::ClientBuilder,
    ) -> Result<clastor_client::ClientBuilder, clastor_client::Error> {
        let mut builder = builder;
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca {
            let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
            let mut tls = clastor_client::TlsConfig::from_pem_files(ca, identity)?;
            if let Some(name) = &self.tls_server_name {
                tls = tls.server_name(name.clone());
            }
            builder = builder.tls(tls);
        }
        Ok(builder)
    }
}

impl ServerOpt {
    /// A client with one connection to the server.
    async fn connect(&self) -> Result<clastor_client::Client, clastor_client::Error> {
        let builder = clastor_client::Client::builder(self.server.as_str())
            .client_name(concat!("clastor-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.connect_timeout);
        self.security.apply(builder)?.connect().await
    }
}

/// `--zk-sessions`' default: the backend's (at least 1; the flag refuses 0).
fn zk_sessions_default() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(clastor::backend::zookeeper::ZkConfig::default().sessions)
        .unwrap_or(std::num::NonZeroUsize::MIN)
}

/// Logging and a single-threaded runtime for the client-side subcommands:
/// they drive one connection, so a second thread would only add hops.
/// `quiet` logs errors only (unless `RUST_LOG` says otherwise).
fn client_runtime(quiet: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let level = if quiet { "error" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}
