//! Library mode: the lock engine in-process over the memory backend, with the
//! same semantics and tokens as over the wire (README, "Library mode").
//! `cargo run --example embed`

use std::time::Duration;

use clastor::backend::memory::MemoryBackend;
use clastor::{AcquireOptions, Engine, EngineConfig, LockKey};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::new(MemoryBackend::new(), EngineConfig::default());
    // `_lost` yields an event for each grant this session loses (a lease ran
    // out, the backend gave up): watch it in a task of your own.
    let (session, _lost) = engine.open_session("my-app");
    let key = LockKey::new("transaction", "tx-123")?;
    if let Some(grant) = session
        .acquire(&key, AcquireOptions::wait(Duration::from_secs(1)))
        .await?
    {
        // Write to the store with grant.token as the fencing token.
        println!("holding {key} with fencing token {}", grant.token);
        session.release(&key).await?;
    }
    Ok(())
}
