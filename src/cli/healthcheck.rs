//! `clastor healthcheck`: asks a server's HTTP port for `/readyz` (or another
//! path) and exits 0 on `200`, 1 otherwise. It exists for container
//! healthchecks: the runtime image is Debian slim, without curl or wget, and
//! this is one plain HTTP/1.1 `GET` on a blocking socket, no runtime needed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

/// Checks a Clastor server's HTTP port: exit 0 when `GET PATH` answers 200.
#[derive(Debug, Args)]
#[command(long_about = "Checks a Clastor server's HTTP port (`clastor serve --http`): sends \
`GET PATH` and exits 0 when the answer is 200, 1 otherwise (another status, no answer \
within --timeout, nothing listening). Made for container healthchecks, where the image \
has no curl:\n\n  healthcheck: test: [\"CMD\", \"clastor\", \"healthcheck\", \"--http\", \
\"127.0.0.1:9078\"]\n\n`/readyz` (the default) is 200 when the backend can grant locks; \
`/healthz` is 200 while the process serves.")]
pub(crate) struct HealthcheckArgs {
    /// The server's HTTP address.
    #[arg(
        long,
        env = "CLASTOR_HTTP",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:9078"
    )]
    http: String,
    /// Path to ask for.
    #[arg(long, default_value = "/readyz", value_name = "PATH")]
    path: String,
    /// Give up after this long (connect, send and answer together).
    #[arg(long, default_value = "3s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Runs `clastor healthcheck`.
pub(crate) fn run(args: HealthcheckArgs) -> ExitCode {
    match check(&args) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("clastor healthcheck: GET {} answered {status}", args.path);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("clastor healthcheck: GET http://{}{}: {e}", args.http, args.path);
            ExitCode::FAILURE
        }
    }
}

/// The status code of `GET path`.
fn check(args: &HealthcheckArgs) -> std::io::Result<u16> {
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
    if !args.path.starts_with('/') || args.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(invalid(format!(
            "path {:?} must start with / and hold no spaces",
            args.path
        )));
    }
    let target = args.http.as_str();
    let deadline = Instant::now() + args.timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
    };
    let mut addr = target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid(format!("{target} names no address")))?;
    // The listen address the server was given (0.0.0.0 in a container, the
    // same CLASTOR_HTTP) is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    write!(
        stream,
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: clastor-healthcheck\r\nConnection: close\r\n\r\n",
        args.path
    )?;
    // The status line is all that is needed: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        stream.set_read_timeout(Some(left()?))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    match (words.next(), words.next().and_then(|s| s.parse::<u16>().ok())) {
        (Some(v), Some(status)) if v.starts_with("HTTP/") => Ok(status),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP answer: {line:?}"),
        )),
    }
}
