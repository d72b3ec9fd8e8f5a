//! The testkit against the real ZooKeeper from Debian's package: start, probe,
//! fault injection and cleanup.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use clastor_testkit::{Mode, ZooKeeper, srvr};

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    cond()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn standalone_starts_answers_srvr_and_stops_on_drop() -> Result<(), Box<dyn std::error::Error>> {
    let zk = ZooKeeper::start()?;
    assert_eq!(zk.len(), 1);
    let addr = zk.addr(0);
    assert!(addr.ip().is_loopback());
    assert_eq!(zk.connect_string(), addr.to_string());
    let answer = srvr(addr, Duration::from_secs(2))?;
    assert_eq!(
        Mode::from_srvr(&answer),
        Some(Mode::Standalone),
        "srvr answered {answer}"
    );
    assert_eq!(zk.leader(), Some(0));
    let pid = zk.pid(0).ok_or("no pid")?;
    let dir = zk.dir().to_path_buf();
    assert!(zk.log_tail(0, 100).contains("QuorumPeerMain") || zk.log_tail(0, 400).contains("ZooKeeperServer"));

    drop(zk);
    assert!(!process_exists(pid), "ZooKeeper pid {pid} still runs after drop");
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    assert!(
        srvr(addr, Duration::from_millis(500)).is_err(),
        "port still answers after drop"
    );
    Ok(())
}

#[test]
fn freeze_stops_answers_and_thaw_resumes() -> Result<(), Box<dyn std::error::Error>> {
    let mut zk = ZooKeeper::start()?;
    zk.freeze(0)?;
    assert!(
        srvr(zk.addr(0), Duration::from_millis(300)).is_err(),
        "a frozen server answered srvr"
    );
    zk.thaw(0)?;
    assert!(wait_until(Duration::from_secs(10), || zk.mode(0) == Some(Mode::Standalone)));
    Ok(())
}

#[test]
fn parallel_instances_get_distinct_ports() -> Result<(), Box<dyn std::error::Error>> {
    let handles: Vec<_> = (0..3).map(|_| thread::spawn(ZooKeeper::start)).collect();
    let mut instances = Vec::new();
    for handle in handles {
        instances.push(handle.join().map_err(|_| "start thread panicked")??);
    }
    let mut addrs: Vec<_> = instances.iter().map(|zk| zk.addr(0)).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 3);
    for zk in &instances {
        assert_eq!(zk.mode(0), Some(Mode::Standalone));
    }
    Ok(())
}

#[test]
fn ensemble_elects_a_leader_and_survives_its_loss() -> Result<(), Box<dyn std::error::Error>> {
    let mut zk = ZooKeeper::ensemble(3)?;
    assert_eq!(zk.len(), 3);
    assert_eq!(zk.connect_string().split(',').count(), 3);
    let leader = zk.leader().ok_or("no leader after start")?;
    let followers = (0..3).filter(|&i| zk.mode(i) == Some(Mode::Follower)).count();
    assert_eq!(followers, 2);

    zk.kill(leader)?;
    assert!(zk.is_down(leader)?);
    assert!(
        wait_until(Duration::from_secs(30), || zk.leader().is_some_and(|l| l != leader)),
        "no new leader after killing node {leader}"
    );
    zk.restart(leader)?;
    assert!(zk.mode(leader).is_some(), "restarted node does not serve");
    assert!(zk.leader().is_some());
    Ok(())
}
