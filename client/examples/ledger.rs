//! A small ledger protected by Clastor: accounts in SQLite, transfers
//! between two accounts under both accounts' locks (`lock_many`), and every
//! write fenced with its account's token, with the read-then-write recipe of
//! the README ("Fencing"): a row remembers the token that last wrote it, and
//! a write lands only if nobody newer wrote since the read.
//!
//! ```text
//! clastor serve &
//! cargo run -p clastor-client --example ledger -- 127.0.0.1:7070 /tmp/ledger.db
//! ```
//!
//! The test suite runs it against an in-process server (`tests/ledger.rs`).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clastor_client::Client;
use rusqlite::{Connection, TransactionBehavior, params};

/// How many accounts the ledger has, and what each starts with.
pub const ACCOUNTS: usize = 5;
/// Starting balance of every account.
pub const START: i64 = 1_000;

type Failure = Box<dyn Error + Send + Sync>;

/// The account names.
pub fn account(i: usize) -> String {
    format!("acct-{i}")
}

/// Opens the ledger at `path`.
///
/// # Errors
/// SQLite's.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    // Other processes write too: wait for them rather than fail.
    db.busy_timeout(Duration::from_secs(30))?;
    Ok(db)
}

/// Creates the ledger at `path` if needed, with its accounts.
///
/// # Errors
/// SQLite's.
pub fn create(path: &Path) -> rusqlite::Result<()> {
    let db = open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS accounts (
             id      TEXT PRIMARY KEY,
             balance INTEGER NOT NULL,
             fence   INTEGER NOT NULL DEFAULT 0  -- the token that last wrote the row
         );",
    )?;
    for i in 0..ACCOUNTS {
        db.execute(
            "INSERT OR IGNORE INTO accounts (id, balance) VALUES (?1, ?2)",
            params![account(i), START],
        )?;
    }
    Ok(())
}

/// A token as SQLite stores integers. Today's backends stay far below
/// `i64::MAX` (README, "Fencing"); one that did not would be refused here
/// rather than wrapped.
fn as_sql(token: u64) -> Result<i64, Failure> {
    i64::try_from(token).map_err(|_| format!("token {token} does not fit a signed 64-bit column").into())
}

/// Reads an account's balance and fence.
fn read(db: &Connection, id: &str) -> rusqlite::Result<(i64, i64)> {
    db.query_row("SELECT balance, fence FROM accounts WHERE id = ?1", [id], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

/// Writes an account's balance with `token`, only if its fence is still
/// `seen` (nobody wrote since the read) and not above `token`. Returns
/// whether the write landed.
fn fenced_write(db: &Connection, id: &str, balance: i64, token: i64, seen: i64) -> rusqlite::Result<bool> {
    let n = db.execute(
        "UPDATE accounts SET balance = ?1, fence = ?2 WHERE id = ?3 AND fence = ?4 AND fence <= ?2",
        params![balance, token, id, seen],
    )?;
    Ok(n == 1)
}

/// Moves `amount` from `from` to `to` under both accounts' locks. Returns
/// whether it was applied (`false`: not granted in time, not enough money,
/// or a fenced write refused).
///
/// # Errors
/// The lock service's or SQLite's.
pub async fn transfer(client: &Client, db: &Path, from: &str, to: &str, amount: i64) -> Result<bool, Failure> {
    let Some(locks) = client
        .lock_many([("account", from), ("account", to)])
        .wait(Duration::from_secs(30))
        .acquire()
        .await?
    else {
        return Ok(false);
    };
    let token = |id: &str| locks.token("account", id).ok_or("a lock of the transfer is missing");
    let (from_token, to_token) = (as_sql(token(from)?)?, as_sql(token(to)?)?);
    let (db, from_id, to_id) = (db.to_path_buf(), from.to_owned(), to.to_owned());
    // SQLite blocks: keep it off the async threads.
    let applied = tokio::task::spawn_blocking(move || -> Result<bool, Failure> {
        let mut db = open(&db)?;
        // Take the write lock up front: two read-then-write transactions
        // upgrading at once would fail one of them instead of waiting.
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (from_balance, from_seen) = read(&tx, &from_id)?;
        let (to_balance, to_seen) = read(&tx, &to_id)?;
        if from_balance < amount {
            return Ok(false);
        }
        let landed = fenced_write(&tx, &from_id, from_balance - amount, from_token, from_seen)?
            && fenced_write(&tx, &to_id, to_balance + amount, to_token, to_seen)?;
        if landed {
            tx.commit()?;
        }
        Ok(landed)
    })
    .await??;
    // The commit is what counts: the release's outcome is no reason to redo
    // (or undo) the transfer.
    let _ = locks.release().await;
    Ok(applied)
}

/// A stale holder's late write (its lock long gone, its token old): with
/// the recipe it never lands. Returns whether it landed.
///
/// # Errors
/// SQLite's.
pub fn late_write(db: &Path, id: &str, balance: i64, stale_token: u64) -> Result<bool, Failure> {
    let db = open(db)?;
    let (_, seen) = read(&db, id)?;
    Ok(fenced_write(&db, id, balance, as_sql(stale_token)?, seen)?)
}

/// The sum of every balance.
///
/// # Errors
/// SQLite's.
pub fn total(db: &Path) -> rusqlite::Result<i64> {
    open(db)?.query_row("SELECT SUM(balance) FROM accounts", [], |r| r.get(0))
}

/// `workers` handles (as many processes would), each doing `transfers`
/// transfers between pseudo-random pairs of accounts; returns how many were
/// applied.
///
/// # Errors
/// The first transfer's error.
pub async fn run(addr: &str, db: &Path, workers: usize, transfers: usize) -> Result<usize, Failure> {
    create(db)?;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (addr, db) = (addr.to_owned(), db.to_path_buf());
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(addr.as_str()).await?;
            let mut applied = 0;
            for t in 0..transfers {
                let from = account((w + t) % ACCOUNTS);
                let to = account((w * 7 + 3 * t + 1) % ACCOUNTS);
                if from != to && transfer(&client, &db, &from, &to, 1 + (t % 10) as i64).await? {
                    applied += 1;
                }
            }
            Ok::<usize, Failure>(applied)
        }));
    }
    let mut applied = 0;
    for task in tasks {
        applied += task.await??;
    }
    Ok(applied)
}

#[allow(dead_code)] // The test suite includes this file and calls `run`.
#[tokio::main]
async fn main() -> Result<(), Failure> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7070".to_owned());
    let db = PathBuf::from(args.next().unwrap_or_else(|| "ledger.db".to_owned()));
    let applied = run(&addr, &db, 4, 100).await?;
    println!(
        "{applied} transfers applied; total {} (started at {})",
        total(&db)?,
        START * ACCOUNTS as i64
    );
    Ok(())
}
