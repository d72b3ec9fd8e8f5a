//! Runs the conformance suite on the etcd backend: one real etcd (Debian's
//! package, via `clastor-testkit`) for the whole run, and per case two
//! engines over two separate `EtcdBackend`s — two "servers" sharing the
//! cluster — so cross-server exclusion is exercised by every case that
//! spreads sessions over the engines.
//!
//! A libtest-mimic harness (`harness = false`): etcd starts once, each case
//! is a named test, and the usual test-binary arguments apply.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use clastor::backend::etcd::{EtcdBackend, EtcdConfig};
use clastor::{Engine, EngineConfig, LockKey};
use clastor_testkit::Etcd;
use conformance::Env;
use etcd_client::{Client, GetOptions};
use libtest_mimic::{Arguments, Failed, Trial};

const PREFIX: &str = "/conformance";

fn config(endpoints: &[String]) -> EtcdConfig {
    EtcdConfig {
        endpoints: endpoints.to_vec(),
        prefix: PREFIX.to_owned(),
        leases: 2,
        lease_ttl: Duration::from_secs(6),
        ..EtcdConfig::default()
    }
}

/// Holder plus waiters of `key` in etcd: keys under its lock prefix under
/// the kind's current version.
async fn count_contenders(etcd: &mut Client, key: &LockKey) -> usize {
    let base = format!("{PREFIX}/{}", key.kind());
    let version = match etcd.get(format!("{base}/version"), None).await {
        Ok(resp) => resp.kvs().first().map_or_else(
            || "v1".to_owned(),
            |kv| {
                String::from_utf8_lossy(kv.value())
                    .lines()
                    .next()
                    .unwrap_or("v1")
                    .to_owned()
            },
        ),
        Err(e) => panic!("read version of {key}: {e}"),
    };
    let dir = format!("{base}/{version}/{}/", key.id());
    match etcd
        .get(dir, Some(GetOptions::new().with_prefix().with_count_only()))
        .await
    {
        Ok(resp) => usize::try_from(resp.count()).unwrap(),
        Err(e) => panic!("count contenders of {key}: {e}"),
    }
}

async fn run_case(endpoints: Vec<String>, case: conformance::Case<EtcdBackend>) -> Result<(), Failed> {
    let a = EtcdBackend::connect(config(&endpoints))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let b = EtcdBackend::connect(config(&endpoints))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let inspect = Client::connect(&endpoints, None)
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let engines = vec![
        Engine::new(a, EngineConfig::default()),
        Engine::new(b, EngineConfig::default()),
    ];
    let env = Env {
        engines: engines.clone(),
        contenders: Arc::new(move |key| {
            let mut etcd = inspect.clone();
            Box::pin(async move { count_contenders(&mut etcd, &key).await })
        }),
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), (case.run)(env)).await;
    for engine in engines {
        engine.shutdown().await;
    }
    outcome.map_err(|_| Failed::from("case did not finish within 60 s"))
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut args = Arguments::from_args();
    // Two cores: more parallel cases only add scheduling noise to the timings.
    args.test_threads = args.test_threads.or(Some(2));
    let etcd = Etcd::start().expect("start etcd (apt-get install -y etcd-server etcd-client)");
    let endpoints = etcd.endpoints();
    let trials = conformance::cases::<EtcdBackend>()
        .into_iter()
        .map(|case| {
            let endpoints = endpoints.clone();
            Trial::test(case.name, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(run_case(endpoints, case))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // `exit` skips destructors: stop etcd first.
    drop(etcd);
    conclusion.exit();
}
