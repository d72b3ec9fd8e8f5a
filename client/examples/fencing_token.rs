//! Why fencing tokens matter: a holder that stalls past its lease (a GC pause,
//! a swapped-out VM) wakes up believing it still holds the lock. Timing cannot
//! stop its late write; the store can, by refusing tokens lower than the
//! highest it has seen.
//!
//! Start a server first (`clastor serve`), then:
//!
//! ```text
//! cargo run -p clastor-client --example fencing_token -- 127.0.0.1:7070
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clastor_client::Client;

/// A store that remembers the highest fencing token per key and rejects
/// writes carrying a lower one.
#[derive(Default)]
struct FencedStore {
    inner: Mutex<HashMap<String, (u64, String)>>,
}

impl FencedStore {
    fn write(&self, key: &str, token: u64, value: &str) -> Result<(), String> {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(key) {
            Some((highest, _)) if token < *highest => {
                Err(format!("rejected write with token {token}: already saw {highest}"))
            }
            _ => {
                map.insert(key.to_owned(), (token, value.to_owned()));
                Ok(())
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), clastor_client::Error> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7070".to_owned());
    let store = Arc::new(FencedStore::default());
    // Two processes, in effect: two clients, two connections.
    let slow = Client::connect(addr.as_str()).await?;
    let fast = Client::connect(addr.as_str()).await?;

    let lease = Duration::from_millis(300);
    let Some(stale) = slow.lock("account", "acct-7").lease(lease).acquire().await? else {
        println!("account/acct-7 is busy; run again later");
        return Ok(());
    };
    println!("slow worker holds the lock with token {}", stale.token());

    // The slow worker stalls past its lease; the server lets the lock go and
    // the fast worker gets it, with a higher token.
    tokio::time::sleep(lease * 2).await;
    let fresh = fast
        .lock("account", "acct-7")
        .wait(Duration::from_secs(5))
        .acquire()
        .await?;
    let Some(fresh) = fresh else {
        println!("unexpected: the lock was not handed over");
        return Ok(());
    };
    println!("fast worker holds the lock with token {}", fresh.token());
    println!(
        "fast worker writes: {:?}",
        store.write("acct-7", fresh.token(), "balance=90")
    );

    // The slow worker wakes up and writes with its old token: refused.
    println!("slow worker's guard says lost = {:?}", stale.lost_reason());
    println!(
        "slow worker writes: {:?}",
        store.write("acct-7", stale.token(), "balance=100")
    );

    fresh.release().await?;
    // Releasing a lost lock reports the loss.
    println!("slow worker's release: {:?}", stale.release().await);
    Ok(())
}
