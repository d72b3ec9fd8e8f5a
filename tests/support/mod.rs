//! Shared test support: an in-process server on `127.0.0.1:0`, and raw
//! clients that speak frames or lines directly, as another implementation or
//! netcat would.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use clastor::backend::memory::MemoryBackend;
use clastor::server::{self, ServerConfig, ServerHandle};
use clastor::{Engine, EngineConfig};
use clastor_protocol::{ClastorCodec, Event, Flags, Frame, Hello, Request, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::Framed;

#[cfg(feature = "grpc")]
pub(crate) mod grpc;
#[cfg(feature = "cli")]
pub(crate) mod hammer;
pub(crate) mod http;
#[cfg(feature = "cli")]
pub(crate) mod process;
#[cfg(feature = "tls")]
pub(crate) mod tls;

/// A server on `127.0.0.1:0` over its own ZooKeeper backend (a "server" of a
/// multi-server deployment sharing `zk`): `sessions` pooled sessions with a
/// 6 s timeout, under `provider`.
#[cfg(feature = "zookeeper")]
pub(crate) async fn start_on_zookeeper(
    zk: &clastor_testkit::ZooKeeper,
    provider: &str,
    sessions: usize,
) -> ServerHandle {
    use clastor::backend::zookeeper::{ZkConfig, ZooKeeperBackend};
    let backend = ZooKeeperBackend::connect(ZkConfig {
        hosts: zk.connect_string(),
        provider: provider.into(),
        sessions,
        session_timeout: Duration::from_secs(6),
        ..ZkConfig::default()
    })
    .await
    .expect("connect backend");
    let config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerConfig::default()
    };
    server::spawn(Engine::new(backend, EngineConfig::default()), config)
        .await
        .expect("start server")
}

/// How long a test waits for something that should happen promptly.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// Starts a memory-backed server on an ephemeral loopback port.
pub(crate) async fn start(config: ServerConfig, engine_config: EngineConfig) -> (ServerHandle, MemoryBackend) {
    let backend = MemoryBackend::new();
    let engine = Engine::new(backend.clone(), engine_config);
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    (server::spawn(engine, config).await.unwrap(), backend)
}

/// Starts a server with default settings.
pub(crate) async fn start_default() -> (ServerHandle, MemoryBackend) {
    start(ServerConfig::default(), EngineConfig::default()).await
}

/// Something the server sent on a binary connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    Response(Response),
    Event(Event),
}

/// A binary-protocol connection driven frame by frame.
pub(crate) struct Raw {
    pub framed: Framed<TcpStream, ClastorCodec>,
    next_id: u32,
}

impl Raw {
    /// Connects without a handshake.
    pub(crate) async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            framed: Framed::new(stream, ClastorCodec::new(clastor_protocol::MAX_FRAME_LEN_CEILING)),
            next_id: 1,
        }
    }

    /// Connects and completes `HELLO`; returns the connection id.
    pub(crate) async fn hello(addr: SocketAddr) -> (Raw, u64) {
        let mut raw = Raw::connect(addr).await;
        let resp = raw
            .call(Request::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client_name: "raw-test".into(),
            }))
            .await;
        match resp.result {
            Ok(clastor_protocol::ResponseBody::Hello(h)) => (raw, h.connection_id),
            other => panic!("handshake failed: {other:?}"),
        }
    }

    /// Sends a request; returns its id.
    pub(crate) async fn send(&mut self, req: &Request) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.framed.send((id, req)).await.unwrap();
        id
    }

    /// Sends raw bytes as they are.
    pub(crate) async fn send_bytes(&mut self, bytes: &[u8]) {
        self.framed.get_mut().write_all(bytes).await.unwrap();
    }

    /// The next frame from the server, decoded; `None` on EOF.
    pub(crate) async fn next(&mut self) -> Option<Incoming> {
        let frame = tokio::time::timeout(PATIENCE, self.framed.next())
            .await
            .expect("server answered in time")?;
        let Frame { header, body } = match frame {
            Ok(f) => f,
            // The server may reset a connection it closed with unread input.
            Err(clastor_protocol::FrameError::Io(_)) => return None,
            Err(e) => panic!("bad frame from server: {e}"),
        };
        Some(if header.flags == Flags::EVENT {
            Incoming::Event(Event::decode(&header, body).unwrap())
        } else {
            Incoming::Response(Response::decode(&header, body).unwrap())
        })
    }

    /// The next response (events are not expected).
    pub(crate) async fn response(&mut self) -> Response {
        match self.next().await {
            Some(Incoming::Response(r)) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Sends and waits for the matching response.
    pub(crate) async fn call(&mut self, req: Request) -> Response {
        let id = self.send(&req).await;
        let resp = self.response().await;
        assert_eq!(resp.request_id, id, "response to another request");
        resp
    }

    /// Asserts that the server closes the connection (after any frames,
    /// which are returned).
    pub(crate) async fn until_closed(&mut self) -> Vec<Incoming> {
        let mut got = Vec::new();
        while let Some(m) = self.next().await {
            got.push(m);
        }
        got
    }
}

/// A text-form connection, as netcat would open.
pub(crate) struct Text {
    pub lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    pub write: OwnedWriteHalf,
}

impl Text {
    pub(crate) async fn connect(addr: SocketAddr) -> Text {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Text {
            lines: BufReader::new(r).lines(),
            write: w,
        }
    }

    pub(crate) async fn send(&mut self, line: &str) {
        self.write.write_all(line.as_bytes()).await.unwrap();
        self.write.write_all(b"\n").await.unwrap();
    }

    /// The next line, `None` on EOF.
    pub(crate) async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("server answered in time")
            .ok()
            .flatten()
    }

    pub(crate) async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await.expect("a reply line")
    }

    /// Reads a multi-line reply body up to the `.` line.
    pub(crate) async fn block(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line().await.expect("block continues");
            if l == "." {
                return out;
            }
            out.push(l);
        }
    }
}

/// The `token=<n>` field of a text reply line.
pub(crate) fn token_of(line: &str) -> u64 {
    line.split(' ')
        .find_map(|w| w.strip_prefix("token="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no token in {line:?}"))
}

impl Text {
    /// Writes bytes as they are.
    pub(crate) async fn write_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
    }
}

/// Starts a server with default settings and connects a client to it.
pub(crate) async fn start_and_connect() -> (ServerHandle, clastor_client::Client) {
    let (server, _) = start_default().await;
    let client = connect(&server).await;
    (server, client)
}

/// A client connected to `server`.
pub(crate) async fn connect(server: &ServerHandle) -> clastor_client::Client {
    clastor_client::Client::connect(server.local_addr()).await.unwrap()
}

/// Takes `kind`/`id` at once; it must be free.
pub(crate) async fn take_free(
    client: &clastor_client::Client,
    kind: &str,
    id: impl Into<String>,
) -> clastor_client::LockGuard {
    client.lock(kind, id).try_acquire().await.unwrap().expect("free")
}

/// Whether `client` is granted `kind`/`id` within [`PATIENCE`].
pub(crate) async fn granted_in_time(client: &clastor_client::Client, kind: &str, id: impl Into<String>) -> bool {
    client.lock(kind, id).wait(PATIENCE).acquire().await.unwrap().is_some()
}

/// A raw exclusive `ACQUIRE` that tries once, with a lease of `lease_ms` (0: none).
pub(crate) fn try_acquire_request(kind: &str, id: &str, lease_ms: u32) -> Request {
    Request::Acquire(clastor_protocol::Acquire {
        kind: kind.into(),
        id: id.into(),
        wait_ms: 0,
        lease_ms,
        mode: clastor_protocol::LockMode::Exclusive,
        trace_id: None,
    })
}

/// Running the `clastor` binary as a user would.
pub(crate) mod cli {
    use std::net::SocketAddr;
    use std::process::{Output, Stdio};

    use nix::sys::signal::Signal;
    use tokio::io::{AsyncBufReadExt, BufReader, Lines};
    use tokio::process::{Child, ChildStdout, Command};

    use super::PATIENCE;

    /// The `clastor` binary, talking to `server`, killed when dropped.
    pub(crate) fn clastor(server: SocketAddr) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clastor"));
        cmd.env("CLASTOR_SERVER", server.to_string())
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        cmd
    }

    /// Runs `cmd` to the end and collects its output.
    pub(crate) async fn run(cmd: &mut Command) -> Output {
        tokio::time::timeout(PATIENCE, cmd.output())
            .await
            .expect("clastor finished in time")
            .unwrap()
    }

    /// Starts `cmd` with stdout and stderr piped.
    pub(crate) fn spawn_piped(cmd: &mut Command) -> Child {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// The lines of a child's piped stdout.
    pub(crate) fn stdout_lines(child: &mut Child) -> Lines<BufReader<ChildStdout>> {
        BufReader::new(child.stdout.take().unwrap()).lines()
    }

    /// The next line of output; `None` at EOF.
    pub(crate) async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<String> {
        tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
    }

    /// Waits for `child` to exit (`what` says why it should, in time).
    pub(crate) async fn output(child: Child, what: &str) -> Output {
        tokio::time::timeout(PATIENCE, child.wait_with_output())
            .await
            .expect(what)
            .unwrap()
    }

    /// Sends `signal` to `child`.
    pub(crate) fn signal(child: &Child, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }
}
