//! The testkit against the real PostgreSQL 15 from Debian's `postgresql`:
//! start, `psql`, freeze and thaw of the whole instance, cleanup.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clastor_testkit::Postgres;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn psql(pg: &Postgres, sql: &str) -> Result<String, Box<dyn std::error::Error>> {
    let out = pg.psql().args(["-c", sql]).output()?;
    if !out.status.success() {
        return Err(format!("psql -c {sql:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

#[test]
fn starts_serves_psql_freezes_thaws_and_stops_on_drop() -> TestResult {
    let mut pg = Postgres::start()?;
    assert!(pg.addr().ip().is_loopback());
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"));
    assert_eq!(psql(&pg, "SELECT 40 + 2")?, "42");
    assert!(psql(&pg, "SHOW server_version")?.starts_with("15"));
    assert_eq!(psql(&pg, "SHOW server_encoding")?, "UTF8");

    // Frozen: a query on a fresh connection is not answered; thawed, it is.
    pg.freeze()?;
    let mut frozen = pg
        .psql()
        .args(["-c", "SELECT 1"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(frozen.try_wait()?.is_none(), "a frozen PostgreSQL answered");
    pg.thaw()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while frozen.try_wait()?.is_none() {
        assert!(Instant::now() < deadline, "no answer after the thaw");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(psql(&pg, "SELECT 1")?, "1");

    let pid = pg.pid().ok_or("no pid")?;
    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "postmaster {pid} runs on");
    assert!(!dir.exists(), "{} left behind", dir.display());
    let leftovers = Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()?;
    assert!(
        leftovers.stdout.is_empty(),
        "processes of the instance left: {:?}",
        leftovers
    );
    Ok(())
}

#[test]
fn two_instances_run_side_by_side() -> TestResult {
    let a = Postgres::start()?;
    let b = Postgres::start()?;
    assert_ne!(a.addr(), b.addr());
    psql(&a, "CREATE TABLE only_in_a (x int)")?;
    assert_eq!(
        psql(&b, "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'")?,
        "0"
    );
    Ok(())
}
