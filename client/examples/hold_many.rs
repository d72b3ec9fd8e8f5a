//! Holds one lock on each of many connections for a while: the steady load
//! that keeping every holder's safe-until fresh (`CONFIRM`s) puts on a
//! server. Measure the server's CPU around it (`scripts/hold_many_cpu.sh`).
//!
//! ```text
//! cargo run --release -p clastor-client --example hold_many -- 127.0.0.1:7070 10000 20
//! ```
//!
//! Prints `ready` on stdout once every lock is held, then holds them for the
//! given number of seconds and reports how many stayed safe.

use std::time::Duration;

use clastor_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7070".to_owned());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);

    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let client = Client::builder(addr.as_str()).keepalive(None).connect().await?;
        let guard = client
            .lock("hold", format!("k{i}"))
            .try_acquire()
            .await?
            .ok_or("lock already taken")?;
        held.push((client, guard));
    }
    let confirming = held.iter().filter(|(_, g)| g.safe_until().is_some()).count();
    eprintln!("holding {n} locks on {n} connections for {secs} s ({confirming} with a safe-until)");
    println!("ready");
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let safe = held.iter().filter(|(_, g)| g.is_safe()).count();
    eprintln!("{safe} of {n} locks still safe");
    println!("done");
    Ok(())
}
