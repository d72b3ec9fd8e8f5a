//! The testkit against the real etcd from Debian's `etcd-server` and
//! `etcd-client`: start, health, etcdctl, fault injection, failover and
//! cleanup.

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use clastor_testkit::{Error, Etcd, EtcdBuilder, etcd_health};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Timings that keep failover within about a second.
fn fast() -> EtcdBuilder {
    Etcd::builder()
        .heartbeat_interval(Duration::from_millis(50))
        .election_timeout(Duration::from_millis(500))
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(25));
    }
    cond()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs an etcdctl command and returns its stdout, or an error with its stderr.
fn run(mut etcdctl: Command) -> Result<String, Box<dyn std::error::Error>> {
    let Output { status, stdout, stderr } = etcdctl.output()?;
    if !status.success() {
        return Err(format!("{etcdctl:?} failed ({status}): {}", String::from_utf8_lossy(&stderr)).into());
    }
    Ok(String::from_utf8(stdout)?)
}

/// `etcdctl get` of one key from one member alone, without a quorum read.
fn get_from(etcd: &Etcd, i: usize, key: &str) -> Result<String, Box<dyn std::error::Error>> {
    let mut etcdctl = Command::new("etcdctl");
    etcdctl
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint(i)))
        .args(["get", "--print-value-only", "--consistency=s", key]);
    run(etcdctl)
}

#[test]
fn single_member_serves_etcdctl_and_stops_on_drop() -> TestResult {
    let etcd = Etcd::start()?;
    assert_eq!(etcd.len(), 1);
    let addr = etcd.client_addr(0);
    assert!(addr.ip().is_loopback());
    assert_eq!(etcd.endpoint(0), format!("http://{addr}"));
    assert_eq!(etcd.endpoints(), vec![etcd.endpoint(0)]);
    assert!(etcd_health(addr, Duration::from_secs(2))?);
    assert_eq!(etcd.leader(), Some(0));

    let mut put = etcd.etcdctl();
    put.args(["put", "clastor/greeting", "hello"]);
    assert_eq!(run(put)?.trim(), "OK");
    let mut get = etcd.etcdctl();
    get.args(["get", "--print-value-only", "clastor/greeting"]);
    assert_eq!(run(get)?.trim(), "hello");

    let pid = etcd.pid(0).ok_or("no pid")?;
    let dir = etcd.dir().to_path_buf();
    let tail = etcd.log_tail(0, 200);
    assert!(tail.contains("\"level\""), "not a zap log:\n{tail}");
    assert!(tail.contains("became leader"), "log tail:\n{tail}");

    drop(etcd);
    assert!(!process_exists(pid), "etcd pid {pid} still runs after drop");
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    assert!(
        etcd_health(addr, Duration::from_millis(500)).is_err(),
        "port still answers after drop"
    );
    Ok(())
}

#[test]
fn freeze_stops_answers_and_thaw_resumes() -> TestResult {
    let mut etcd = fast().start()?;
    let addr = etcd.client_addr(0);
    etcd.freeze(0)?;
    assert!(
        etcd_health(addr, Duration::from_millis(300)).is_err(),
        "a frozen member answered /health"
    );
    assert_eq!(etcd.leader(), None, "a frozen member is not asked");
    etcd.thaw(0)?;
    etcd.wait_ready(Duration::from_secs(10))?;
    assert!(etcd_health(addr, Duration::from_secs(2))?);
    assert_eq!(etcd.leader(), Some(0));
    Ok(())
}

#[test]
fn parallel_instances_get_distinct_ports() -> TestResult {
    let handles: Vec<_> = (0..2).map(|_| thread::spawn(|| fast().start())).collect();
    let mut instances = Vec::new();
    for handle in handles {
        instances.push(handle.join().map_err(|_| "start thread panicked")??);
    }
    assert_ne!(instances[0].endpoint(0), instances[1].endpoint(0));
    assert_ne!(instances[0].dir(), instances[1].dir());
    for etcd in &instances {
        assert_eq!(etcd.leader(), Some(0));
    }
    Ok(())
}

#[test]
fn cluster_elects_a_leader_fails_over_and_rejoins() -> TestResult {
    let mut etcd = fast().members(3).start()?;
    assert_eq!(etcd.len(), 3);
    let endpoints = etcd.endpoints();
    assert_eq!(endpoints.len(), 3);
    for i in 0..3 {
        assert!(etcd_health(etcd.client_addr(i), Duration::from_secs(2))?, "member {i}");
    }
    let leader = etcd.leader().ok_or("no leader after start")?;

    etcd.kill(leader)?;
    assert!(etcd.is_down(leader)?);
    assert!(etcd_health(etcd.client_addr(leader), Duration::from_millis(300)).is_err());
    assert!(
        wait_until(Duration::from_secs(10), || etcd.leader().is_some_and(|l| l != leader)),
        "no new leader after killing member {leader}"
    );
    // The two survivors are a quorum: writes go on.
    let mut put = etcd.etcdctl();
    put.args(["put", "clastor/written-while-down", "yes"]);
    assert_eq!(run(put)?.trim(), "OK");

    let pid_before = etcd.pid((leader + 1) % 3);
    etcd.restart(leader)?;
    assert!(etcd.pid(leader).is_some());
    assert!(etcd_health(etcd.client_addr(leader), Duration::from_secs(2))?);
    assert!(etcd.leader().is_some());
    // It rejoined with its old data and caught up on what it missed.
    assert!(
        wait_until(Duration::from_secs(10), || get_from(
            &etcd,
            leader,
            "clastor/written-while-down"
        )
        .is_ok_and(|v| v.trim() == "yes")),
        "restarted member {leader} did not catch up"
    );
    assert_eq!(etcd.pid((leader + 1) % 3), pid_before, "restart touched another member");

    let pids: Vec<u32> = (0..3).filter_map(|i| etcd.pid(i)).collect();
    assert_eq!(pids.len(), 3);
    let dir = etcd.dir().to_path_buf();
    drop(etcd);
    for pid in pids {
        assert!(!process_exists(pid), "etcd pid {pid} still runs after drop");
    }
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    Ok(())
}

#[test]
fn a_member_that_exits_during_startup_is_reported_with_its_log() {
    // etcd refuses an election timeout under 5 heartbeats, and exits.
    let result = Etcd::builder()
        .heartbeat_interval(Duration::from_millis(100))
        .election_timeout(Duration::from_millis(200))
        .start();
    match result {
        Err(err @ Error::Exited { .. }) => {
            let message = err.to_string();
            assert!(message.starts_with("etcd member 0 exited during startup"), "{message}");
            assert!(message.contains("election-timeout"), "no log tail in: {message}");
        }
        other => panic!("expected Error::Exited, got {other:?}"),
    }
}
