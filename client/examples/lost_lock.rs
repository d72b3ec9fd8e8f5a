//! React to losing a lock while working: `select!` on `guard.lost()` around
//! the critical section, and stop the work when it fires.
//!
//! The first run keeps a short lease alive with automatic renewal; the second
//! uses the same lease without renewal, so the server ends it mid-work and the
//! work is abandoned.
//!
//! Start a server first (`clastor serve`), then:
//!
//! ```text
//! cargo run -p clastor-client --example lost_lock -- 127.0.0.1:7070
//! ```

use std::time::Duration;

use clastor_client::{Client, LockGuard};

/// Ten steps of work, each stamped with the fencing token.
async fn work(token: u64) {
    for step in 1..=10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        println!("  step {step}/10 done under token {token}");
    }
}

async fn run(guard: LockGuard) -> Result<(), clastor_client::Error> {
    tokio::select! {
        reason = guard.lost() => {
            // Stop touching the resource at once: someone else may hold it now.
            println!("  lock lost ({reason}); work abandoned");
            Ok(())
        }
        () = work(guard.token()) => {
            guard.release().await?;
            println!("  work finished, lock released");
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), clastor_client::Error> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7070".to_owned());
    let client = Client::connect(addr).await?;
    let lease = Duration::from_millis(400);

    println!("with automatic renewal (lease {lease:?}, work takes ~1s):");
    if let Some(guard) = client
        .lock("job", "nightly")
        .lease(lease)
        .auto_renew(true)
        .acquire()
        .await?
    {
        run(guard).await?;
    }

    println!("without renewal:");
    if let Some(guard) = client.lock("job", "nightly").lease(lease).acquire().await? {
        run(guard).await?;
    }
    Ok(())
}
