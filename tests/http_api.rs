//! The HTTP port over real HTTP: metrics present and moving, health and
//! readiness (readiness following a frozen ZooKeeper or etcd), the REST API's
//! lifecycle including a lease running out, hostile names and bodies
//! refused with the right JSON code, health checks answering while lock
//! requests fill their limit, the original Clastor's endpoints, and
//! listings that name clients but never show tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use clastor::backend::Backend;
use clastor::backend::etcd::{EtcdBackend, EtcdConfig};
use clastor::backend::memory::MemoryBackend;
use clastor::backend::zookeeper::{ZkConfig, ZooKeeperBackend};
use clastor::server::{self, HttpConfig, ServerConfig, ServerHandle};
use clastor::{Engine, EngineConfig};
use clastor_testkit::{Etcd, ZooKeeper};
use serde_json::Value;
use support::PATIENCE;
use support::http::{Reply, get, metric, post, request};
use tokio::time::Instant;

async fn start_with<B: Backend>(backend: B, http: HttpConfig) -> (ServerHandle, SocketAddr) {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some(http),
        ..ServerConfig::default()
    };
    let handle = server::spawn(Engine::new(backend, EngineConfig::default()), config)
        .await
        .unwrap();
    let http = handle.http_addr().expect("the HTTP port is on");
    (handle, http)
}

fn http_config() -> HttpConfig {
    HttpConfig::new("127.0.0.1:0".parse().unwrap())
}

async fn start() -> (ServerHandle, SocketAddr) {
    start_with(MemoryBackend::new(), http_config()).await
}

async fn client(handle: &ServerHandle) -> clastor_client::Client {
    clastor_client::Client::connect(handle.local_addr()).await.unwrap()
}

/// Polls `check` until it returns `Some`, failing after `within`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn code(reply: &Reply) -> String {
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "errors are JSON: {reply:?}"
    );
    let v = reply.json();
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v["code"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_move_with_grants_and_a_lost_lock() {
    let (handle, http) = start_with(
        MemoryBackend::new(),
        HttpConfig {
            max_metric_kinds: 2,
            ..http_config()
        },
    )
    .await;
    let healthz = get(http, "/healthz").await;
    assert_eq!((healthz.status, healthz.json()["status"].as_str()), (200, Some("ok")));
    let readyz = get(http, "/readyz").await;
    assert_eq!((readyz.status, readyz.json()["status"].as_str()), (200, Some("ready")));

    let before = get(http, "/metrics").await;
    assert_eq!(before.status, 200);
    assert!(before.header("content-type").unwrap().starts_with("text/plain"));
    assert!(
        before.body.contains("# HELP clastor_connections_open"),
        "{}",
        before.body
    );
    assert_eq!(
        metric(&before.body, "clastor_acquires_granted_total", "kind=\"job\""),
        0.0
    );

    let c = client(&handle).await;
    let other = client(&handle).await;
    let a = c.lock("job", "a").acquire().await.unwrap().unwrap();
    // Contention: a try-once that is not granted.
    assert!(other.lock("job", "a").acquire().await.unwrap().is_none());
    a.release().await.unwrap();
    // A lease that runs out: the lock is lost.
    let b = c
        .lock("job", "b")
        .lease(Duration::from_millis(200))
        .acquire()
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(PATIENCE, b.lost())
        .await
        .expect("the lease runs out");
    // Kinds past the cap (2: job, then k1) are counted under `other`.
    for kind in ["k1", "k2", "k3"] {
        c.lock(kind, "x")
            .acquire()
            .await
            .unwrap()
            .unwrap()
            .release()
            .await
            .unwrap();
    }

    let m = get(http, "/metrics").await.body;
    let v = |name: &str, labels: &str| metric(&m, name, labels);
    assert_eq!(v("clastor_acquires_granted_total", "kind=\"job\""), 2.0, "{m}");
    assert_eq!(v("clastor_acquires_not_granted_total", "kind=\"job\""), 1.0, "{m}");
    assert_eq!(v("clastor_releases_total", "kind=\"job\",how=\"release\""), 1.0, "{m}");
    assert_eq!(v("clastor_locks_lost_total", "reason=\"lease_expired\""), 1.0, "{m}");
    assert_eq!(v("clastor_leases_expired_total", ""), 1.0, "{m}");
    assert_eq!(v("clastor_acquire_wait_seconds_count", "kind=\"job\""), 2.0, "{m}");
    assert_eq!(v("clastor_hold_seconds_count", "kind=\"job\""), 2.0, "{m}");
    assert!(v("clastor_hold_seconds_sum", "kind=\"job\"") >= 0.2, "{m}");
    assert_eq!(v("clastor_acquires_granted_total", "kind=\"k1\""), 1.0, "{m}");
    assert_eq!(v("clastor_acquires_granted_total", "kind=\"other\""), 2.0, "{m}");
    assert!(!m.contains("kind=\"k3\""), "kinds past the cap have no label: {m}");
    assert!(v("clastor_requests_total", "opcode=\"ACQUIRE\"") >= 6.0, "{m}");
    assert_eq!(v("clastor_connections_open", ""), 2.0, "{m}");
    assert_eq!(v("clastor_connections_accepted_total", ""), 2.0, "{m}");
    assert_eq!(v("clastor_backend_ready", ""), 1.0, "{m}");
    assert_eq!(v("clastor_locks_held", ""), 0.0, "{m}");

    drop((c, other));
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_lifecycle_with_waiters_renewal_release_and_a_lease_running_out() {
    let (handle, http) = start().await;
    let base = "/api/v1/locks/orders";

    let first = post(http, &format!("{base}/o-1/acquire?leaseMs=5000")).await;
    assert_eq!(first.status, 200, "{first:?}");
    let first = first.json();
    assert_eq!(first["status"], "ACQUIRED");
    assert_eq!(
        (first["resource"].as_str(), first["resourceId"].as_str()),
        (Some("orders"), Some("o-1"))
    );
    assert_eq!(first["version"], "v1");
    assert_eq!(first["leaseMs"], 5000);
    let token1: u64 = first["token"].as_str().expect("the token is a string").parse().unwrap();

    // Held: a try-once is refused, as NOT_ACQUIRED.
    let busy = post(http, &format!("{base}/o-1/acquire")).await;
    assert_eq!(busy.status, 409);
    assert_eq!(busy.json()["status"], "NOT_ACQUIRED");

    // A second HTTP caller queues behind the first.
    let waiter =
        tokio::spawn(async move { post(http, &format!("{base}/o-1/acquire?timeoutMs=10000&leaseMs=5000")).await });
    let listed: Value = eventually(PATIENCE, "the waiter is listed", || async {
        let held = get(http, "/api/v1/locks/held").await.json();
        let lock = held["locks"]
            .as_array()?
            .iter()
            .find(|l| l["resourceId"] == "o-1")?
            .clone();
        (lock["waiters"].as_array()?.len() == 1).then_some(lock)
    })
    .await;
    // Listings never show the token: it is the capability to release.
    assert!(listed.get("token").is_none(), "{listed}");
    assert!(
        listed["holder"].as_str().unwrap().starts_with("http 127.0.0.1:"),
        "{listed}"
    );
    assert!(listed["leaseRemainingMs"].as_u64().unwrap() <= 5000);

    // Renew needs the token.
    let renewed = post(http, &format!("{base}/o-1/renew?token={token1}&leaseMs=8000")).await;
    assert_eq!(renewed.status, 200, "{renewed:?}");
    assert_eq!(renewed.json()["status"], "RENEWED");
    assert_eq!(
        code(&post(http, &format!("{base}/o-1/renew?token={}", token1 + 1)).await),
        "NOT_HELD"
    );

    // Release needs the token: none is a bad request, a wrong one a conflict.
    let none = post(http, &format!("{base}/o-1/release")).await;
    assert_eq!((none.status, code(&none).as_str()), (400, "BAD_REQUEST"));
    let wrong = post(http, &format!("{base}/o-1/release?token={}", token1 + 1)).await;
    assert_eq!((wrong.status, code(&wrong).as_str()), (409, "NOT_HELD"));
    // The token may come in a JSON body too.
    let released = request(
        http,
        "POST",
        &format!("{base}/o-1/release"),
        &[("Content-Type", "application/json")],
        format!("{{\"token\":\"{token1}\"}}").as_bytes(),
    )
    .await;
    assert_eq!(released.status, 200, "{released:?}");
    assert_eq!(released.json()["status"], "RELEASED");
    // Releasing again is refused: the token no longer names a grant.
    assert_eq!(
        post(http, &format!("{base}/o-1/release?token={token1}")).await.status,
        409
    );

    // The waiter gets it, with a greater token.
    let second = waiter.await.unwrap();
    assert_eq!(second.status, 200, "{second:?}");
    let token2: u64 = second.json()["token"].as_str().unwrap().parse().unwrap();
    assert!(token2 > token1);
    // A binary-protocol client is excluded too.
    let c = client(&handle).await;
    assert!(c.lock("orders", "o-1").acquire().await.unwrap().is_none());
    assert_eq!(
        post(http, &format!("{base}/o-1/release?token={token2}")).await.status,
        200
    );

    // A lease that runs out: the lock goes, and its token releases nothing.
    let short = post(http, &format!("{base}/o-2/acquire?leaseMs=300")).await.json();
    let token3 = short["token"].as_str().unwrap().to_owned();
    eventually(PATIENCE, "the expired lock leaves the listing", || async {
        let held = get(http, "/api/v1/locks/held").await.json();
        held["locks"]
            .as_array()?
            .iter()
            .all(|l| l["resourceId"] != "o-2")
            .then_some(())
    })
    .await;
    let late = post(http, &format!("{base}/o-2/release?token={token3}")).await;
    assert_eq!((late.status, code(&late).as_str()), (409, "NOT_HELD"));
    let again = post(http, &format!("{base}/o-2/acquire")).await;
    assert_eq!(again.status, 200);
    assert!(again.json()["leaseMs"].as_u64().unwrap() > 0, "a default lease");
    let m = get(http, "/metrics").await.body;
    assert_eq!(
        metric(&m, "clastor_locks_lost_total", "reason=\"lease_expired\""),
        1.0,
        "{m}"
    );

    let version = get(http, "/api/v1/locks/orders/version").await;
    assert_eq!(version.status, 200);
    assert_eq!(
        (version.json()["version"].as_str(), version.json()["mode"].as_str()),
        (Some("v1"), Some("normal"))
    );
    let openapi = get(http, "/api/v1/openapi.json").await.json();
    assert_eq!(openapi["openapi"], "3.0.3");
    assert!(openapi["paths"]["/api/v1/locks/{kind}/{id}/acquire"]["post"].is_object());

    drop(c);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_bodies_are_refused_with_json_codes() {
    let (handle, http) = start().await;
    let long = "k".repeat(129);
    for (target, status, want) in [
        ("/api/v1/locks/a%2Fb/x/acquire".to_owned(), 400, "INVALID_NAME"),
        ("/api/v1/locks/k/%00/acquire".to_owned(), 400, "INVALID_NAME"),
        ("/api/v1/locks/%2E%2E/x/acquire".to_owned(), 400, "INVALID_NAME"),
        ("/api/v1/locks/k/a%20b/acquire".to_owned(), 400, "INVALID_NAME"),
        ("/api/v1/locks/k/%FF%FE/acquire".to_owned(), 400, "INVALID_NAME"),
        (format!("/api/v1/locks/{long}/x/acquire"), 400, "INVALID_NAME"),
        (
            "/api/v1/locks/k/x/acquire?timeoutMs=soon".to_owned(),
            400,
            "BAD_REQUEST",
        ),
        ("/api/v1/locks/k/x/acquire?timeoutMs=-1".to_owned(), 400, "BAD_REQUEST"),
        (
            "/api/v1/locks/k/x/acquire?timeoutMs=999999999".to_owned(),
            400,
            "BAD_REQUEST",
        ),
        ("/api/v1/locks/k/x/acquire?leaseMs=0".to_owned(), 400, "BAD_REQUEST"),
        ("/api/v1/locks/k/x/release?token=abc".to_owned(), 400, "BAD_REQUEST"),
        ("/api/v1/locks/k/x/release?token=0".to_owned(), 400, "BAD_REQUEST"),
        (
            "/api/v1/locks/k/x/release?token=99999999999999999999999".to_owned(),
            400,
            "BAD_REQUEST",
        ),
        ("/api/v1/locks/k/x/renew".to_owned(), 400, "BAD_REQUEST"),
        ("/api/v1/nothing/here".to_owned(), 404, "UNKNOWN_OPCODE"),
    ] {
        let reply = post(http, &target).await;
        assert_eq!(
            (reply.status, code(&reply)),
            (status, want.to_owned()),
            "{target}: {reply:?}"
        );
    }
    let get_acquire = get(http, "/api/v1/locks/k/x/acquire").await;
    assert_eq!((get_acquire.status, code(&get_acquire).as_str()), (405, "BAD_REQUEST"));
    let bad_version = get(http, "/api/v1/locks/a%2Fb/version").await;
    assert_eq!((bad_version.status, code(&bad_version).as_str()), (400, "INVALID_NAME"));

    let json = [("Content-Type", "application/json")];
    for body in [&b"{not json"[..], b"[1,2]", b"{\"timeoutMs\":\"soon\"}", b"\xff\xfe"] {
        let reply = request(http, "POST", "/api/v1/locks/k/x/acquire", &json, body).await;
        assert_eq!((reply.status, code(&reply).as_str()), (400, "BAD_REQUEST"), "{body:?}");
    }
    let huge = vec![b' '; 1 << 20];
    let reply = request(http, "POST", "/api/v1/locks/k/x/acquire", &json, &huge).await;
    assert_eq!((reply.status, code(&reply).as_str()), (413, "LIMIT_EXCEEDED"));
    // A JSON body with the parameters is fine, and nothing above took a lock.
    let ok = request(http, "POST", "/api/v1/locks/k/x/acquire", &json, b"{\"leaseMs\": 1000}").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.json()["leaseMs"], 1000);
    let held = get(http, "/api/v1/locks/held").await.json();
    assert_eq!(held["locks"].as_array().unwrap().len(), 1, "{held}");
    handle.shutdown().await;
}

/// `/readyz` is 503 while the ZooKeeper the server uses is frozen (its one
/// session no longer in proven contact), and 200 again after the thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_a_frozen_zookeeper() {
    let mut zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let backend = ZooKeeperBackend::connect(ZkConfig {
        hosts: zk.connect_string(),
        provider: "http-readyz".to_owned(),
        sessions: 1,
        session_timeout: Duration::from_secs(4),
        ..ZkConfig::default()
    })
    .await
    .expect("connect");
    let (handle, http) = start_with(backend, http_config()).await;
    let ready = |want: u16| {
        move || async move {
            let r = get(http, "/readyz").await;
            (r.status == want).then_some(r)
        }
    };
    eventually(PATIENCE, "ready at first", ready(200)).await;
    let m = get(http, "/metrics").await.body;
    assert_eq!(metric(&m, "clastor_zk_session_trusted", "session=\"0\""), 1.0, "{m}");
    assert!(metric(&m, "clastor_zk_requests_total", "session=\"0\"") >= 1.0, "{m}");
    let probe = eventually(PATIENCE, "a probe round trip", || async {
        let m = get(http, "/metrics").await.body;
        let v = metric(&m, "clastor_zk_session_probe_seconds", "session=\"0\"");
        (v > 0.0).then_some(v)
    })
    .await;
    assert!(probe < 5.0, "{probe}");

    zk.freeze(0).unwrap();
    let frozen = Instant::now();
    let not_ready = eventually(Duration::from_secs(30), "503 while ZooKeeper is frozen", ready(503)).await;
    println!(
        "/readyz said 503 {:?} after the freeze: {}",
        frozen.elapsed(),
        not_ready.body
    );
    assert_eq!(code_free_status(&not_ready), "unavailable");
    let m = get(http, "/metrics").await.body;
    assert_eq!(metric(&m, "clastor_backend_ready", ""), 0.0, "{m}");
    assert_eq!(metric(&m, "clastor_zk_session_trusted", "session=\"0\""), 0.0, "{m}");
    let status = get(http, "/api/v1/status").await.json();
    assert_eq!(status["backend"]["ready"], false, "{status}");

    zk.thaw(0).unwrap();
    let thawed = Instant::now();
    eventually(Duration::from_secs(60), "200 after the thaw", ready(200)).await;
    println!("/readyz said 200 again {:?} after the thaw", thawed.elapsed());
    handle.shutdown().await;
}

/// The same with etcd: `/readyz` is 503 while the etcd the server uses is
/// frozen (its lease without an answered keepalive past 3/5 of the TTL),
/// 200 again after the thaw; the lease's metrics are the etcd ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_a_frozen_etcd() {
    let mut etcd = Etcd::start().expect("start etcd (apt-get install -y etcd-server etcd-client)");
    let backend = EtcdBackend::connect(EtcdConfig {
        endpoints: etcd.endpoints(),
        prefix: "/http-readyz".to_owned(),
        leases: 1,
        lease_ttl: Duration::from_secs(2),
        ..EtcdConfig::default()
    })
    .await
    .expect("connect");
    let (handle, http) = start_with(backend, http_config()).await;
    let ready = |want: u16| {
        move || async move {
            let r = get(http, "/readyz").await;
            (r.status == want).then_some(r)
        }
    };
    eventually(PATIENCE, "ready at first", ready(200)).await;
    let m = get(http, "/metrics").await.body;
    assert_eq!(metric(&m, "clastor_etcd_session_trusted", "session=\"0\""), 1.0, "{m}");
    assert!(!m.contains("clastor_zk_session"), "{m}");

    etcd.freeze(0).unwrap();
    let frozen = Instant::now();
    let not_ready = eventually(Duration::from_secs(30), "503 while etcd is frozen", ready(503)).await;
    println!(
        "/readyz said 503 {:?} after the freeze: {}",
        frozen.elapsed(),
        not_ready.body
    );
    assert_eq!(code_free_status(&not_ready), "unavailable");
    let m = get(http, "/metrics").await.body;
    assert_eq!(metric(&m, "clastor_backend_ready", ""), 0.0, "{m}");

    etcd.thaw(0).unwrap();
    eventually(Duration::from_secs(60), "200 after the thaw", ready(200)).await;
    let m = get(http, "/metrics").await.body;
    assert_eq!(metric(&m, "clastor_etcd_session_trusted", "session=\"0\""), 1.0, "{m}");
    handle.shutdown().await;
}

fn code_free_status(reply: &Reply) -> String {
    reply.json()["status"].as_str().unwrap().to_owned()
}

/// Rotation over REST: the version endpoint shows the drain, a second
/// rotation and a wrong `from` get 409 with the protocol's codes, an abort
/// ends a running one (409 `ROTATION_ABORTED`), and a completed one answers
/// `ROTATED`; the rotation metrics follow. A lock id named `rotate` is still
/// a lock id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_over_rest_with_progress_refusals_and_abort() {
    let (handle, http) = start().await;
    let c = client(&handle).await;
    let held = c.lock("ledger", "acc-1").acquire().await.unwrap().unwrap();
    let running =
        tokio::spawn(async move { post(http, "/api/v1/locks/ledger/rotate?from=v1&to=v2&drainTimeoutMs=20000").await });
    let v: Value = eventually(PATIENCE, "the kind drains", || async {
        let v = get(http, "/api/v1/locks/ledger/version").await.json();
        (v["mode"] == "draining").then_some(v)
    })
    .await;
    assert_eq!(
        (v["version"].as_str(), v["drain"]["to"].as_str()),
        (Some("v1"), Some("v2"))
    );
    assert_eq!(v["drain"]["remaining"], 1);
    let second = post(http, "/api/v1/locks/ledger/rotate?from=v1&to=v3").await;
    assert_eq!((second.status, code(&second)), (409, "ROTATION_REFUSED".to_owned()));
    let missing = post(http, "/api/v1/locks/ledger/rotate?from=v1").await;
    assert_eq!((missing.status, code(&missing)), (400, "BAD_REQUEST".to_owned()));
    let text = get(http, "/metrics").await.body;
    assert_eq!(
        metric(&text, "clastor_rotation_draining", "kind=\"ledger\""),
        1.0,
        "{text}"
    );

    let aborted = post(http, "/api/v1/locks/ledger/rotate/abort").await;
    assert_eq!(aborted.status, 200, "{aborted:?}");
    assert_eq!(
        (aborted.json()["aborted"].as_bool(), aborted.json()["version"].as_str()),
        (Some(true), Some("v1"))
    );
    let ended = running.await.unwrap();
    assert_eq!((ended.status, code(&ended)), (409, "ROTATION_ABORTED".to_owned()));

    held.release().await.unwrap();
    let done = post(http, "/api/v1/locks/ledger/rotate").await;
    assert_eq!(done.status, 400, "from and to are required");
    let done = request(
        http,
        "POST",
        "/api/v1/locks/ledger/rotate",
        &[("content-type", "application/json")],
        br#"{"from":"v1","to":"v2"}"#,
    )
    .await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(
        (done.json()["status"].as_str(), done.json()["version"].as_str()),
        (Some("ROTATED"), Some("v2"))
    );
    let wrong = post(http, "/api/v1/locks/ledger/rotate?from=v7&to=v8").await;
    assert_eq!((wrong.status, code(&wrong)), (409, "ROTATION_REFUSED".to_owned()));
    let text = get(http, "/metrics").await.body;
    assert_eq!(
        metric(
            &text,
            "clastor_rotations_total",
            "kind=\"ledger\",outcome=\"completed\""
        ),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "clastor_rotation_draining", "kind=\"ledger\""), 0.0);
    // A lock id that looks like the rotation path is still a lock id.
    let odd = post(http, "/api/v1/locks/ledger/rotate/acquire").await;
    assert_eq!(odd.status, 200, "{odd:?}");
    assert_eq!(odd.json()["version"], "v2");
    handle.shutdown().await;
}

/// Every metric family in a Prometheus exposition has a `# HELP` line.
fn families_without_help(text: &str) -> Vec<String> {
    let helped: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|name| !helped.contains(name))
        .map(str::to_owned)
        .collect()
}

/// Waiting acquires fill the lock-request limit: health, readiness and
/// metrics still answer 200, and one more acquire (either path form) or a
/// rotation gets an immediate JSON 429 instead of a closed socket. The
/// answers are counted by route template, and every metric has its HELP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_while_waiting_acquires_fill_the_limit() {
    let (handle, http) = start_with(
        MemoryBackend::new(),
        HttpConfig {
            max_connections: 6,
            max_lock_requests: 2,
            ..http_config()
        },
    )
    .await;
    let c = client(&handle).await;
    let held = [
        c.lock("job", "x").acquire().await.unwrap().unwrap(),
        c.lock("job", "z").acquire().await.unwrap().unwrap(),
    ];
    let ours = tokio::spawn(async move { post(http, "/api/v1/locks/job/x/acquire?timeoutMs=30000").await });
    let compat =
        tokio::spawn(async move { post(http, "/api/v1/locks/job/acquire?resourceId=z&timeoutMs=30000").await });
    eventually(PATIENCE, "both acquires wait", || async {
        let held = get(http, "/api/v1/locks/held").await.json();
        let waiting: usize = held["locks"]
            .as_array()?
            .iter()
            .map(|l| l["waiters"].as_array().map_or(0, Vec::len))
            .sum();
        (waiting == 2).then_some(())
    })
    .await;

    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/status"] {
        assert_eq!(get(http, path).await.status, 200, "{path}");
    }
    for target in [
        "/api/v1/locks/job/y/acquire",
        "/api/v1/locks/job/acquire?resourceId=y",
        "/api/v1/locks/job/rotate?from=v1&to=v2",
    ] {
        let refused = post(http, target).await;
        assert_eq!(
            (refused.status, code(&refused).as_str()),
            (429, "LIMIT_EXCEEDED"),
            "{target}"
        );
    }

    let m = get(http, "/metrics").await.body;
    let requests = |route: &str, status: u16| {
        metric(
            &m,
            "clastor_http_requests_total",
            &format!("route=\"{route}\",status=\"{status}\""),
        )
    };
    assert_eq!(requests("/api/v1/locks/{kind}/{id}/acquire", 429), 1.0, "{m}");
    assert_eq!(requests("/api/v1/locks/{resource}/acquire", 429), 1.0, "{m}");
    assert_eq!(requests("/healthz", 200), 1.0, "{m}");
    assert!(requests("/api/v1/locks/held", 200) >= 1.0, "{m}");
    assert!(!m.contains("route=\"/api/v1/locks/job"), "raw paths never label: {m}");
    assert!(m.contains("# TYPE clastor_http_requests_total counter"), "{m}");
    assert_eq!(families_without_help(&m), Vec::<String>::new(), "{m}");

    // The waiting acquires were left alone: they get their locks.
    for h in held {
        h.release().await.unwrap();
    }
    for waiter in [ours, compat] {
        let got = waiter.await.unwrap();
        assert_eq!((got.status, got.json()["status"].as_str()), (200, Some("ACQUIRED")));
    }
    drop(c);
    handle.shutdown().await;
}

/// Past the connection limit a new connection is answered — a JSON 503
/// `LIMIT_EXCEEDED` with `Retry-After` — not reset; once a slot frees,
/// requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_a_json_503() {
    let (handle, http) = start_with(
        MemoryBackend::new(),
        HttpConfig {
            max_connections: 2,
            max_lock_requests: 1,
            ..http_config()
        },
    )
    .await;
    // Accepted in the order they connected: these two take both slots
    // before the request below is accepted.
    let idle = [
        tokio::net::TcpStream::connect(http).await.unwrap(),
        tokio::net::TcpStream::connect(http).await.unwrap(),
    ];
    let refused = get(http, "/healthz").await;
    assert_eq!((refused.status, code(&refused).as_str()), (503, "LIMIT_EXCEEDED"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    drop(idle);
    let m = eventually(PATIENCE, "served again", || async {
        let r = get(http, "/metrics").await;
        (r.status == 200).then_some(r.body)
    })
    .await;
    assert!(metric(&m, "clastor_http_connections_refused_total", "") >= 1.0, "{m}");
    handle.shutdown().await;
}

/// The original Clastor's endpoints, answered in its shapes: acquire with
/// `resourceId` (200 ACQUIRED / 200 FAILED), its default wait (the acquire
/// waits rather than trying once), release by token (200 RELEASED / 200
/// NOT_HELD), a tokenless release refused with a 400 that names the switch,
/// and the original's `/held` array under `?format=legacy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_endpoints_answer_in_their_shapes() {
    let (handle, http) = start().await;
    let got = post(http, "/api/v1/locks/orders/acquire?resourceId=o-1").await;
    assert_eq!(got.status, 200, "{got:?}");
    let got = got.json();
    assert_eq!(
        (
            got["resource"].as_str(),
            got["resourceId"].as_str(),
            got["status"].as_str()
        ),
        (Some("orders"), Some("o-1"), Some("ACQUIRED"))
    );
    let token = got["token"].as_str().unwrap().to_owned();

    let failed = post(http, "/api/v1/locks/orders/acquire?resourceId=o-1&timeoutMs=50").await;
    assert_eq!(failed.status, 200, "the original answers 200 either way: {failed:?}");
    assert_eq!(
        (failed.json()["status"].as_str(), failed.json()["resourceId"].as_str()),
        (Some("FAILED"), Some("o-1"))
    );

    // No timeoutMs: the original's default wait, so it queues (a try-once
    // would have answered FAILED without ever being listed).
    let waiting = tokio::spawn(async move { post(http, "/api/v1/locks/orders/acquire?resourceId=o-1").await });
    eventually(PATIENCE, "the default-wait acquire queues", || async {
        let held = get(http, "/api/v1/locks/held").await.json();
        let lock = held["locks"]
            .as_array()?
            .iter()
            .find(|l| l["resourceId"] == "o-1")?
            .clone();
        (lock["waiters"].as_array()?.len() == 1).then_some(())
    })
    .await;

    let legacy = get(http, "/api/v1/locks/held?format=legacy").await;
    assert_eq!(legacy.json(), serde_json::json!(["orders/o-1"]));

    let tokenless = post(http, "/api/v1/locks/orders/release?resourceId=o-1").await;
    assert_eq!((tokenless.status, code(&tokenless).as_str()), (400, "BAD_REQUEST"));
    assert!(
        tokenless.json()["message"]
            .as_str()
            .unwrap()
            .contains("--http-compat-tokenless-release"),
        "{tokenless:?}"
    );
    let wrong: u64 = token.parse::<u64>().unwrap() + 1;
    let not_held = post(
        http,
        &format!("/api/v1/locks/orders/release?resourceId=o-1&token={wrong}"),
    )
    .await;
    assert_eq!(
        (not_held.status, not_held.json()["status"].as_str()),
        (200, Some("NOT_HELD"))
    );
    let released = post(
        http,
        &format!("/api/v1/locks/orders/release?resourceId=o-1&token={token}"),
    )
    .await;
    assert_eq!(
        (released.status, released.json()["status"].as_str()),
        (200, Some("RELEASED"))
    );
    let second = waiting.await.unwrap();
    assert_eq!(
        (second.status, second.json()["status"].as_str()),
        (200, Some("ACQUIRED"))
    );

    let missing = post(http, "/api/v1/locks/orders/acquire").await;
    assert_eq!((missing.status, code(&missing).as_str()), (400, "BAD_REQUEST"));
    let openapi = get(http, "/api/v1/openapi.json").await.json();
    for path in ["/api/v1/locks/{resource}/acquire", "/api/v1/locks/{resource}/release"] {
        assert!(openapi["paths"][path]["post"].is_object(), "{path} is described");
    }
    handle.shutdown().await;
}

/// With the compatibility switch on, a tokenless release on the original's
/// path releases whatever HTTP lock the key has, as the original did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenless_release_is_honoured_only_with_the_switch() {
    let (handle, http) = start_with(
        MemoryBackend::new(),
        HttpConfig {
            compat_tokenless_release: true,
            ..http_config()
        },
    )
    .await;
    let got = post(http, "/api/v1/locks/orders/acquire?resourceId=o-9").await;
    assert_eq!(got.json()["status"], "ACQUIRED");
    let released = post(http, "/api/v1/locks/orders/release?resourceId=o-9").await;
    assert_eq!(
        (released.status, released.json()["status"].as_str()),
        (200, Some("RELEASED"))
    );
    let again = post(http, "/api/v1/locks/orders/release?resourceId=o-9").await;
    assert_eq!((again.status, again.json()["status"].as_str()), (200, Some("NOT_HELD")));
    let retaken = post(http, "/api/v1/locks/orders/acquire?resourceId=o-9&timeoutMs=0").await;
    assert_eq!(retaken.json()["status"], "ACQUIRED", "the release freed the key");
    handle.shutdown().await;
}

/// A query parameter an endpoint does not know is a 400 naming it, on
/// every REST endpoint — not ignored (a misspelt `timeoutMS` would turn a
/// wait into a try-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_query_parameters_are_refused_by_name() {
    let (handle, http) = start().await;
    for (method, target, name) in [
        ("POST", "/api/v1/locks/k/x/acquire?timeoutMS=5000", "timeoutMS"),
        ("POST", "/api/v1/locks/k/x/renew?token=1&lease=5", "lease"),
        ("POST", "/api/v1/locks/k/x/release?token=1&force=true", "force"),
        ("POST", "/api/v1/locks/k/x/acquire?resourceId=x", "resourceId"),
        ("POST", "/api/v1/locks/k/acquire?resourceId=x&timeout=5", "timeout"),
        ("POST", "/api/v1/locks/k/release?resourceId=x&all=1", "all"),
        ("POST", "/api/v1/locks/k/rotate?from=v1&to=v2&drain=5", "drain"),
        ("POST", "/api/v1/locks/k/rotate/abort?now=1", "now"),
        ("GET", "/api/v1/locks/held?page=2", "page"),
        ("GET", "/api/v1/locks/k/version?verbose=1", "verbose"),
        ("GET", "/api/v1/status?pretty=1", "pretty"),
    ] {
        let reply = request(http, method, target, &[], b"").await;
        assert_eq!((reply.status, code(&reply).as_str()), (400, "BAD_REQUEST"), "{target}");
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(name), "{target}: {message}");
    }
    let body = request(
        http,
        "POST",
        "/api/v1/locks/k/x/acquire",
        &[("Content-Type", "application/json")],
        br#"{"timeoutMs":0,"lease":5}"#,
    )
    .await;
    assert_eq!((body.status, code(&body).as_str()), (400, "BAD_REQUEST"));
    assert!(
        get(http, "/api/v1/locks/held").await.json()["locks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    handle.shutdown().await;
}

/// Listings name each holder's and waiter's client (binary `HELLO`, HTTP
/// `User-Agent`), and never show a token, in `/api/v1/locks/held` and in
/// `/api/v1/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_name_clients_and_show_no_tokens() {
    let (handle, http) = start().await;
    let worker = clastor_client::Client::builder(handle.local_addr())
        .client_name("billing-worker-7")
        .connect()
        .await
        .unwrap();
    let binary = worker.lock("ledger", "acc-1").acquire().await.unwrap().unwrap();
    let over_http = request(
        http,
        "POST",
        "/api/v1/locks/ledger/acc-2/acquire",
        &[("User-Agent", "batch-job/2.1")],
        b"",
    )
    .await;
    assert_eq!(over_http.status, 200);
    let http_token = over_http.json()["token"].as_str().unwrap().to_owned();
    let tokens = [binary.token().to_string(), http_token];

    let held = get(http, "/api/v1/locks/held").await;
    let client_of = |listing: &Value, id: &str| {
        listing["locks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["resourceId"] == id)
            .map(|l| l["client"].clone())
    };
    let listing = held.json();
    assert_eq!(
        client_of(&listing, "acc-1"),
        Some(Value::from("billing-worker-7")),
        "{listing}"
    );
    assert_eq!(
        client_of(&listing, "acc-2"),
        Some(Value::from("batch-job/2.1")),
        "{listing}"
    );
    let status = get(http, "/api/v1/status").await;
    let connections = status.json()["connections"].clone();
    assert!(
        connections
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["client"] == "billing-worker-7" && c["id"] == binary.connection_id()),
        "{connections}"
    );
    for (what, body) in [("held", &held.body), ("status", &status.body)] {
        assert!(!body.contains("\"token\""), "{what}: {body}");
        for t in &tokens {
            assert!(!body.contains(t.as_str()), "{what} shows token {t}: {body}");
        }
    }
    // Nor does the lock port's HELD ALL (text and binary form share it) show
    // the HTTP lock's token, the capability to release it; a connection's
    // own token stays listed.
    let mut text = support::Text::connect(handle.local_addr()).await;
    assert!(text.cmd("HELD ALL").await.starts_with("+HELD 2"));
    let lines = text.block().await;
    let line = |id: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("ledger {id} ")))
            .cloned()
            .unwrap()
    };
    assert!(line("acc-2").contains(" token=0 "), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains(tokens[1].as_str())), "{lines:?}");
    assert!(line("acc-1").contains(&format!(" token={} ", tokens[0])), "{lines:?}");
    drop(binary);
    handle.shutdown().await;
}

/// `?mode=shared`: readers hold together, a writer is refused beside them,
/// listings and `version` show modes and the layout; a bad mode is a 400.
#[tokio::test]
async fn shared_locks_over_rest() {
    let (_server, http) = start().await;
    let base = "/api/v1/locks/report/r-1";
    let r1 = post(http, &format!("{base}/acquire?mode=shared")).await;
    let r2 = post(http, &format!("{base}/acquire?mode=shared")).await;
    assert_eq!((r1.status, r2.status), (200, 200), "{} {}", r1.body, r2.body);
    assert_eq!(r1.json()["mode"], "shared");
    assert_ne!(r1.json()["token"], r2.json()["token"]);
    let w = post(http, &format!("{base}/acquire")).await;
    assert_eq!((w.status, w.json()["status"].as_str()), (409, Some("NOT_ACQUIRED")));
    let held = get(http, "/api/v1/locks/held").await.json();
    let modes: Vec<&str> = held["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["shared", "shared"], "{held}");
    let v = get(http, "/api/v1/locks/report/version").await.json();
    assert_eq!(v["layout"], "read_write", "{v}");
    let bad = post(http, &format!("{base}/acquire?mode=sometimes")).await;
    assert_eq!((bad.status, code(&bad).as_str()), (400, "BAD_REQUEST"), "{}", bad.body);
}
