//! Runs the conformance suite on the in-memory backend, with two engines'
//! worth of sessions sharing one store (the memory backend cannot span
//! processes, so "two servers" are two handles on one engine).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use clastor::backend::memory::MemoryBackend;
use clastor::{Engine, EngineConfig};
use conformance::Env;
use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let args = Arguments::from_args();
    let trials = conformance::cases::<MemoryBackend>()
        .into_iter()
        .map(|case| {
            Trial::test(case.name, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let backend = MemoryBackend::new();
                    let engine = Engine::new(backend.clone(), EngineConfig::default());
                    let env = Env {
                        engines: vec![engine.clone(), engine],
                        contenders: Arc::new(move |key| {
                            let n = backend.contenders(&key);
                            Box::pin(async move { n })
                        }),
                    };
                    tokio::time::timeout(Duration::from_secs(60), (case.run)(env))
                        .await
                        .map_err(|_| Failed::from("case did not finish within 60 s"))
                })
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
