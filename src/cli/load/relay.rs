//! The structural floor of a lock service that sits between its clients
//! and a store, as Clastor does: a bare relay on loopback TCP that runs
//! the store's floor steps (ZooKeeper's `create` then `delete`, etcd's
//! transaction then delete, `INSERT` then `DELETE`, `SET NX PX` then `DEL`)
//! on behalf of a client, one request frame per step.
//!
//! Each acquire+release sample is two client→relay round trips, each with
//! the store's step inside it — what Clastor's pair costs at the very
//! least (two hops plus the floor), with none of Clastor's own work: no
//! protocol decoding, engine, tokens, queueing or sessions. Measured in the
//! same loops as Clastor and the floor (`--interleave`), so "floor + two
//! hops" is a figure of the run, not a sum of guesses.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{OpFn, op_fn};

/// One step of a store's floor pair: `(worker, step, slot)` → slot. Step 0
/// takes (its answer, e.g. a row id, is the slot), step 1 gives back what
/// step 0 took.
pub(super) type StepFn =
    Arc<dyn Fn(usize, u8, i64) -> Pin<Box<dyn Future<Output = anyhow::Result<i64>> + Send>> + Send + Sync>;

/// A [`StepFn`] from a closure.
pub(super) fn step_fn<F, Fut>(f: F) -> StepFn
where
    F: Fn(usize, u8, i64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<i64>> + Send + 'static,
{
    Arc::new(move |i, step, slot| Box::pin(f(i, step, slot)))
}

/// The floor pair itself: both steps, straight from the worker.
pub(super) fn pair(step: StepFn) -> OpFn {
    op_fn(move |i| {
        let step = step.clone();
        async move {
            let slot = step(i, 0, 0).await?;
            step(i, 1, slot).await?;
            Ok(())
        }
    })
}

/// Bytes of a request frame and of its answer: about an `ACQUIRE`'s and an
/// `ACQUIRED`'s (`load`/`k{i}`), both steps alike.
const FRAME: usize = 32;

/// The relay: a loopback server running `step` for each request frame, and
/// a connection to it per worker. The server stops when the returned
/// operation is dropped.
pub(super) async fn relayed(step: StepFn, workers: usize) -> anyhow::Result<OpFn> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let step = step.clone();
            tokio::spawn(async move {
                let mut req = [0u8; FRAME];
                while s.read_exact(&mut req).await.is_ok() {
                    let (worker, slot) = (u32_at(&req, 1) as usize, i64_at(&req, 5));
                    let mut resp = [0u8; FRAME];
                    match step(worker, req[0], slot).await {
                        Ok(slot) => resp[1..9].copy_from_slice(&slot.to_be_bytes()),
                        Err(_) => resp[0] = 1,
                    }
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let stop = Arc::new(AbortOnDrop(server));
    let mut conns = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        conns.push(tokio::sync::Mutex::new(s));
    }
    let conns = Arc::new(conns);
    Ok(op_fn(move |i| {
        let (conns, _stop) = (conns.clone(), stop.clone());
        async move {
            let mut s = conns[i % conns.len()].lock().await;
            let slot = hop(&mut s, i, 0, 0).await?;
            hop(&mut s, i, 1, slot).await?;
            Ok(())
        }
    }))
}

/// One request to the relay and its answer.
async fn hop(s: &mut TcpStream, worker: usize, step: u8, slot: i64) -> anyhow::Result<i64> {
    let mut req = [0u8; FRAME];
    req[0] = step;
    req[1..5].copy_from_slice(&u32::try_from(worker).unwrap_or(u32::MAX).to_be_bytes());
    req[5..13].copy_from_slice(&slot.to_be_bytes());
    s.write_all(&req).await?;
    let mut resp = [0u8; FRAME];
    s.read_exact(&mut resp).await?;
    if resp[0] != 0 {
        bail!("the relay's store step failed");
    }
    Ok(i64_at(&resp, 1))
}

fn u32_at(b: &[u8; FRAME], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn i64_at(b: &[u8; FRAME], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(x)
}

/// Stops the relay's accept loop with the last operation holding it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
