//! The gRPC API from the outside, the way other languages meet it: a Python
//! client generated from `proto/clastor/v1/lock.proto` alone (grpcio-tools,
//! Debian's python3-grpc-tools) against `clastor serve --grpc-listen`; a
//! mixed hammer (Python gRPC streams and Rust binary clients, two servers on
//! one ZooKeeper: no two holders at once); and a frozen server whose gRPC
//! holder falls into jeopardy before the other server grants its lock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clastor::server::grpc_proto as pb;
use clastor_testkit::ZooKeeper;
use pb::session_event::Event as Out;
use pb::session_request::Op;
use support::grpc::{Stream, acquire, connect};
use support::hammer::{OnError, contend_counted};
use support::process::{Server, free_port, send_signal, wall_ns};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The Python client; Debian's interpreter, where python3-grpcio and
/// python3-grpc-tools install (CI installs them: a missing one fails here).
fn python(args: &[&str]) -> Command {
    let mut c = Command::new("/usr/bin/python3");
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/client.py"))
        .args(args);
    c
}

/// A `clastor serve` with a gRPC port, and that port.
fn serve_with_grpc(extra: &[&str]) -> (Server, SocketAddr) {
    let grpc = free_port();
    let grpc_arg = grpc.to_string();
    let mut args = vec!["--grpc-listen", grpc_arg.as_str()];
    args.extend_from_slice(extra);
    (Server::start(&args), grpc)
}

#[test]
fn a_python_client_generated_from_the_proto_alone_works() {
    let (server, grpc) = serve_with_grpc(&["--worker-threads", "1"]);
    let out = python(&["check", &grpc.to_string()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "python client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    server.terminate();
}

/// The same Python client over TLS (ALPN `h2`, as grpcio insists), with a
/// client certificate that names no principal and a bearer token: the
/// server's refusals reach another language with their codes and
/// `clastor-status`.
#[test]
fn a_python_client_over_tls_with_a_client_certificate_and_a_token() {
    use support::tls::TestCa;
    let ca = TestCa::new("clastor gRPC test CA");
    let server_pem = ca.server();
    let nobody = ca.client("nobody");
    let token = "grpc-writer-token-5d1e";
    let auth = ca.dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[principal]]\nname = \"writer\"\ntoken_sha256 = \"{}\"\n[principal.grants]\ntransaction = [\"acquire\"]\n",
            clastor::server::hash_token(token)
        ),
    )
    .unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (auth, cert, key, client_ca) = (
        path(&auth),
        path(&server_pem.cert),
        path(&server_pem.key),
        path(&ca.ca_file()),
    );
    let (server, grpc) = serve_with_grpc(&[
        "--auth-file",
        &auth,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca,
    ]);
    let out = python(&[
        "secured",
        &grpc.to_string(),
        &client_ca,
        &path(&nobody.cert),
        &path(&nobody.key),
        token,
    ])
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "python client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains(token) && !stdout.contains(token));
    server.terminate();
}

/// Two `clastor serve` processes X and Y on one ZooKeeper, with gRPC ports.
fn two_servers(zk: &ZooKeeper, session_timeout: &str) -> ((Server, SocketAddr), (Server, SocketAddr)) {
    let connect = zk.connect_string();
    let args = [
        "--backend",
        "zookeeper",
        "--zk",
        &connect,
        "--zk-session-timeout",
        session_timeout,
        "--zk-sessions",
        "1",
    ];
    (serve_with_grpc(&args), serve_with_grpc(&args))
}

/// One grant as its holder believed it, on the wall clock.
#[derive(Debug, Clone)]
struct Held {
    token: u64,
    from_ns: u128,
    until_ns: u128,
    who: String,
}

/// A Python hammering process; its beliefs are collected as they come.
fn python_hammer(addr: SocketAddr, name: &str, into: Arc<Mutex<Vec<Held>>>, grants: Arc<AtomicUsize>) -> Child {
    let mut child = python(&["hammer", &addr.to_string(), name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 5 && f[0] == "belief" {
                into.lock().unwrap().push(Held {
                    who: format!("grpc-{}", f[1]),
                    token: f[2].parse().unwrap(),
                    from_ns: f[3].parse().unwrap(),
                    until_ns: f[4].parse().unwrap(),
                });
                grants.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    child
}

/// Python gRPC streams and Rust binary clients contend for one lock
/// through two servers on one ZooKeeper: over 5,000 grants, no two
/// holders' beliefs overlap, and tokens grow in grant order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_binary_clients_on_two_servers_never_overlap() {
    const GRANTS: usize = 5_000;
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let ((x, x_grpc), (y, y_grpc)) = two_servers(&zk, "6s");
    let grants = Arc::new(AtomicUsize::new(0));
    let python_beliefs = Arc::new(Mutex::new(Vec::new()));
    let mut pythons = vec![
        python_hammer(x_grpc, "x", python_beliefs.clone(), grants.clone()),
        python_hammer(y_grpc, "y", python_beliefs.clone(), grants.clone()),
    ];
    let stop = CancellationToken::new();
    let rust: Vec<_> = [(x.addr, 'x'), (y.addr, 'y')]
        .into_iter()
        .map(|(addr, name)| {
            tokio::spawn(contend_counted(
                addr,
                name,
                stop.clone(),
                Duration::from_millis(1),
                OnError::Fail,
                grants.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while grants.load(Ordering::Relaxed) < GRANTS {
        assert!(
            Instant::now() < deadline,
            "only {} grants in two minutes",
            grants.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for p in &mut pythons {
        drop(p.stdin.take());
    }
    let mut beliefs: Vec<Held> = Vec::new();
    for w in rust {
        beliefs.extend(w.await.unwrap().into_iter().map(|b| Held {
            token: b.token,
            from_ns: b.from_ns,
            until_ns: b.until_ns,
            who: format!("binary-{}", b.server),
        }));
    }
    for mut p in pythons {
        let status = tokio::task::spawn_blocking(move || p.wait()).await.unwrap().unwrap();
        assert!(status.success(), "python hammer exited with {status}");
    }
    beliefs.extend(python_beliefs.lock().unwrap().drain(..));
    beliefs.sort_by_key(|b| b.from_ns);
    for who in ["binary-x", "binary-y", "grpc-x", "grpc-y"] {
        assert!(beliefs.iter().any(|b| b.who == who), "{who} was never granted");
    }
    assert!(beliefs.len() >= GRANTS, "{} grants", beliefs.len());
    for pair in beliefs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(a.until_ns <= b.from_ns, "two holders at once: {a:?} and {b:?}");
        assert!(b.token > a.token, "tokens not increasing: {a:?} then {b:?}");
    }
    let grpc = beliefs.iter().filter(|b| b.who.starts_with("grpc")).count();
    println!("{} grants, {grpc} of them over gRPC, no overlap", beliefs.len());
    x.terminate();
    y.terminate();
}

/// A frozen server (a long pause, a hung host): the gRPC holder's
/// safe-until, kept fresh by confirms on its stream, runs out — jeopardy —
/// before ZooKeeper expires the server's session and the other server
/// grants the lock to a binary client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_s_grpc_holder_is_in_jeopardy_before_another_grant() {
    let zk = ZooKeeper::builder()
        .tick_time(Duration::from_millis(500))
        .start()
        .expect("start ZooKeeper (apt-get install -y zookeeper)");
    let ((x, x_grpc), (y, _)) = two_servers(&zk, "4s");
    let mut client = connect(x_grpc).await;
    let mut holder = Stream::open(&mut client).await;
    let sent = Instant::now();
    let out = holder.call(1, Op::Acquire(acquire("tx", "frozen", 0))).await;
    let Out::Acquired(g) = out else { panic!("{out:?}") };
    assert!(g.granted && g.safe_ms > 0 && g.safe_ms < u32::MAX, "{g:?}");
    let mut safe_until = sent + Duration::from_millis(u64::from(g.safe_ms));

    let waiter = clastor_client::Client::connect(y.addr).await.unwrap();
    let wait = tokio::spawn(async move {
        loop {
            match waiter
                .lock("tx", "frozen")
                .wait(Duration::from_secs(60))
                .acquire()
                .await
            {
                Ok(Some(g)) => return (wall_ns(), g),
                Ok(None) => panic!("not granted within a minute"),
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    });

    // The holder confirms every confirm_ms, as a client must; a confirm
    // counts from its send. Then X freezes.
    let every = Duration::from_millis(u64::from(holder.confirm_ms));
    let mut sends = std::collections::HashMap::new();
    let mut next_id = 2;
    let mut frozen_at = None;
    let freeze_after = Instant::now() + every * 3;
    let jeopardy_ns = loop {
        if frozen_at.is_none() && Instant::now() >= freeze_after {
            send_signal(x.child.id(), "STOP");
            frozen_at = Some(wall_ns());
        }
        tokio::select! {
            () = tokio::time::sleep_until(safe_until) => break wall_ns(),
            () = tokio::time::sleep(every) => {
                sends.insert(next_id, Instant::now());
                holder.send(next_id, Op::Confirm(pb::Empty {})).await;
                next_id += 1;
            }
            ev = holder.next() => match ev {
                Some((id, Out::Confirmed(c))) => {
                    if let Some(at) = sends.remove(&id) {
                        safe_until = safe_until.max(at + Duration::from_millis(u64::from(c.safe_ms)));
                    }
                }
                other => panic!("unexpected {other:?}"),
            },
        }
    };
    let frozen_at = frozen_at.expect("froze before jeopardy");
    let (granted_ns, granted) = wait.await.unwrap();
    assert!(granted.token() > g.token);
    println!(
        "X frozen at 0: gRPC holder in jeopardy after {} ms, Y granted after {} ms",
        (jeopardy_ns - frozen_at) / 1_000_000,
        (granted_ns - frozen_at) / 1_000_000
    );
    assert!(
        jeopardy_ns < granted_ns,
        "jeopardy came after another holder was granted"
    );
    send_signal(x.child.id(), "CONT");
    drop(granted);
    drop(holder);
    x.terminate();
    y.terminate();
}
