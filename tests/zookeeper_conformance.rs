//! Runs the conformance suite on the ZooKeeper backend: one real ZooKeeper
//! (Debian's package, via `clastor-testkit`) for the whole run, and per case
//! two engines over two separate `ZooKeeperBackend`s — two "servers" sharing
//! the ensemble — so cross-server exclusion is exercised by every case that
//! spreads sessions over the engines.
//!
//! A libtest-mimic harness (`harness = false`): ZooKeeper starts once, each
//! case is a named test, and the usual test-binary arguments (a name filter,
//! `--test-threads`) apply.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use clastor::backend::zookeeper::{ZkConfig, ZooKeeperBackend, path_segment};
use clastor::{Engine, EngineConfig, LockKey};
use clastor_testkit::ZooKeeper;
use conformance::Env;
use libtest_mimic::{Arguments, Failed, Trial};
use zookeeper_client::Client;

const PROVIDER: &str = "conformance";

fn config(hosts: &str) -> ZkConfig {
    ZkConfig {
        hosts: hosts.to_owned(),
        provider: PROVIDER.to_owned(),
        sessions: 2,
        session_timeout: Duration::from_secs(6),
        ..ZkConfig::default()
    }
}

/// Holder plus waiters of `key` in ZooKeeper: lock-named children of its lock
/// directory under the kind's current version.
async fn count_contenders(zk: &Client, key: &LockKey) -> usize {
    let base = format!("/locks/{PROVIDER}/{}", path_segment(key.kind()));
    let version = match zk.get_data(&format!("{base}/version")).await {
        Ok((data, _)) => String::from_utf8_lossy(&data).lines().next().unwrap_or("v1").to_owned(),
        Err(zookeeper_client::Error::NoNode) => return 0,
        Err(e) => panic!("read version of {key}: {e}"),
    };
    match zk
        .list_children(&format!("{base}/{version}/{}", path_segment(key.id())))
        .await
    {
        Ok(children) => children
            .iter()
            .filter(|c| {
                ["lock-", "__lock__", "__rlock__", "__READ__", "__WRIT__"]
                    .iter()
                    .any(|m| c.contains(m))
            })
            .count(),
        Err(zookeeper_client::Error::NoNode) => 0,
        Err(e) => panic!("list contenders of {key}: {e}"),
    }
}

async fn run_case(hosts: String, case: conformance::Case<ZooKeeperBackend>) -> Result<(), Failed> {
    let a = ZooKeeperBackend::connect(config(&hosts))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let b = ZooKeeperBackend::connect(config(&hosts))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let inspect = Client::connect(&hosts).await.map_err(|e| Failed::from(e.to_string()))?;
    let engines = vec![
        Engine::new(a, EngineConfig::default()),
        Engine::new(b, EngineConfig::default()),
    ];
    let env = Env {
        engines: engines.clone(),
        contenders: Arc::new(move |key| {
            let zk = inspect.clone();
            Box::pin(async move { count_contenders(&zk, &key).await })
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
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let hosts = zk.connect_string();
    let trials = conformance::cases::<ZooKeeperBackend>()
        .into_iter()
        .map(|case| {
            let hosts = hosts.clone();
            Trial::test(case.name, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(run_case(hosts, case))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // `exit` skips destructors: stop ZooKeeper first.
    drop(zk);
    conclusion.exit();
}
