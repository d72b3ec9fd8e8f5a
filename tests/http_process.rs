//! `clastor serve --http ... --log-format json` as a process: trace ids sent
//! with an ACQUIRE (the Rust client, protocol version 3) and with a REST
//! acquire (W3C `traceparent`) show up in the server's JSON log lines and in
//! `HELD ALL`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::Text;
use support::http::{get, request};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A `clastor serve` child with its stderr lines collected; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    http: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start() -> Server {
        let (addr, http) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_clastor"))
            .args(["serve", "--listen", &addr.to_string(), "--http", &http.to_string()])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "clastor=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let logs = Arc::new(Mutex::new(Vec::new()));
        loop {
            let line = lines.next().expect("server exited before listening").unwrap();
            let listening = line.contains("\"listening\"");
            logs.lock().unwrap().push(line);
            if listening {
                break;
            }
            assert!(Instant::now() < deadline, "server did not start");
        }
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Server {
            child,
            addr,
            http,
            logs,
        }
    }

    /// The log lines that mention `needle`, once at least `n` do.
    async fn logged(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<String> = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} log lines mention {needle}:\n{}",
                self.logs.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_ids_reach_the_json_logs_and_held_all() {
    let server = Server::start();
    // Every line is one JSON object.
    for line in server.logs.lock().unwrap().iter() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }

    // The Rust client, per lock request.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client = clastor_client::Client::connect(server.addr).await.unwrap();
    let guard = client
        .lock("transaction", "tx-traced")
        .trace_id(trace)
        .acquire()
        .await
        .unwrap()
        .unwrap();
    let untraced = client.lock("transaction", "tx-plain").acquire().await.unwrap().unwrap();

    let mut text = Text::connect(server.addr).await;
    assert!(text.cmd("HELD ALL").await.starts_with("+HELD 2"));
    let held = text.block().await;
    let traced_line = held.iter().find(|l| l.starts_with("transaction tx-traced ")).unwrap();
    assert!(
        traced_line.ends_with(&format!(" trace={trace} mode=exclusive")),
        "{traced_line}"
    );
    assert!(
        held.iter()
            .any(|l| l.starts_with("transaction tx-plain ") && !l.contains("trace=")),
        "{held:?}"
    );

    // The lines logged for the request carry the trace id as a span field.
    let lines = server.logged(trace, 2).await;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let in_span = v["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["trace_id"] == trace))
            || v["span"]["trace_id"] == trace
            || v["fields"]["trace_id"] == trace;
        assert!(in_span, "the trace id is a field of the line: {line}");
    }
    assert!(lines.iter().any(|l| l.contains("\"acquire\"")), "{lines:?}");
    // Later lines about the grant name it too.
    guard.release().await.unwrap();
    let released = server.logged(trace, lines.len() + 1).await;
    assert!(released.iter().any(|l| l.contains("released")), "{released:?}");

    // REST, with W3C trace context.
    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{rest_trace}-b7ad6b7169203331-01");
    let reply = request(
        server.http,
        "POST",
        "/api/v1/locks/transaction/tx-rest/acquire?leaseMs=10000",
        &[("traceparent", traceparent.as_str())],
        b"",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["traceId"], rest_trace);
    assert!(text.cmd("HELD ALL").await.starts_with("+HELD 2"));
    let held = text.block().await;
    assert!(
        held.iter().any(
            |l| l.starts_with("transaction tx-rest ") && l.ends_with(&format!("trace={rest_trace} mode=exclusive"))
        ),
        "{held:?}"
    );
    let listed = get(server.http, "/api/v1/locks/held").await.json();
    let rest_lock = listed["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["resourceId"] == "tx-rest")
        .unwrap()
        .clone();
    assert_eq!(rest_lock["traceId"], rest_trace);
    server.logged(rest_trace, 2).await;

    drop(untraced);
}

/// `clastor healthcheck` (the compose file's healthcheck: the image has no
/// curl): exit 0 on `/readyz` answering 200, 1 on another status or nothing
/// listening; the listen address `0.0.0.0` (a container's `CLASTOR_HTTP`)
/// is asked on loopback.
#[test]
fn healthcheck_exits_zero_only_on_200() {
    let server = Server::start();
    let check = |http: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_clastor"))
            .args(["healthcheck", "--http", http])
            .args(extra)
            .env_remove("CLASTOR_HTTP")
            .output()
            .unwrap()
    };
    let http = server.http.to_string();
    assert!(check(&http, &[]).status.success());
    assert!(check(&http, &["--path", "/healthz"]).status.success());
    let wildcard = format!("0.0.0.0:{}", server.http.port());
    assert!(check(&wildcard, &[]).status.success());
    let missing = check(&http, &["--path", "/no-such-page"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));
    // Nothing listens on the lock port's neighbour that was just freed.
    let closed = free_port().to_string();
    let refused = check(&closed, &["--timeout", "2s"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(!check(&http, &["--path", "no-slash"]).status.success());
}
