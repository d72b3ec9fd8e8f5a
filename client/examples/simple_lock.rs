//! Take a lock, use its fencing token, release it.
//!
//! Start a server first (`clastor serve`), then:
//!
//! ```text
//! cargo run -p clastor-client --example simple_lock -- 127.0.0.1:7070
//! ```

use std::time::Duration;

use clastor_client::Client;

#[tokio::main]
async fn main() -> Result<(), clastor_client::Error> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7070".to_owned());
    let client = Client::connect(addr).await?;

    // Wait up to five seconds for the lock (FIFO behind other waiters).
    let Some(guard) = client
        .lock("transaction", "tx-123")
        .wait(Duration::from_secs(5))
        .acquire()
        .await?
    else {
        println!("transaction/tx-123 is busy; try again later");
        return Ok(());
    };
    println!(
        "holding {}/{} with fencing token {} (connection {})",
        guard.kind(),
        guard.id(),
        guard.token(),
        guard.connection_id()
    );

    // ... the critical section: pass guard.token() to every store you write to ...

    // Explicit release reports whether the lock was held to the end.
    guard.release().await?;
    println!("released");
    Ok(())
}
