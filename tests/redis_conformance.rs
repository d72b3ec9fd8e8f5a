//! Runs the conformance suite on the Redis backend: one real Redis (Debian's
//! package, via `clastor-testkit`) for the whole run, and per case two
//! engines over two separate `RedisBackend`s — two "servers", each with its
//! own session, sharing the Redis — so cross-server exclusion is exercised by
//! every case that spreads sessions over the engines.
//!
//! A libtest-mimic harness (`harness = false`): Redis starts once, each case
//! is a named test, and the usual test-binary arguments apply.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use clastor::backend::redis::{RedisBackend, RedisConfig, queue_key};
use clastor::{Engine, EngineConfig, LockKey};
use clastor_testkit::Redis;
use conformance::Env;
use libtest_mimic::{Arguments, Failed, Trial};
use redis::aio::MultiplexedConnection;

const PREFIX: &str = "conformance";

fn config(url: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_owned(),
        prefix: PREFIX.to_owned(),
        session_ttl: Duration::from_secs(6),
        ..RedisConfig::default()
    }
}

/// Holder plus waiters of `key` in Redis: members of its queue under the
/// kind's current version.
async fn count_contenders(redis: &mut MultiplexedConnection, key: &LockKey) -> usize {
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("{PREFIX}/{}/version", key.kind()))
        .query_async(redis)
        .await
        .unwrap_or_else(|e| panic!("read version of {key}: {e}"));
    let version = record
        .as_deref()
        .and_then(|r| r.lines().next())
        .unwrap_or("v1")
        .to_owned();
    redis::cmd("ZCARD")
        .arg(queue_key(PREFIX, key.kind(), &version, key.id()))
        .query_async(redis)
        .await
        .unwrap_or_else(|e| panic!("count contenders of {key}: {e}"))
}

async fn run_case(url: String, case: conformance::Case<RedisBackend>) -> Result<(), Failed> {
    let a = RedisBackend::connect(config(&url))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let b = RedisBackend::connect(config(&url))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let inspect = redis::Client::open(url.as_str())
        .map_err(|e| Failed::from(e.to_string()))?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let engines = vec![
        Engine::new(a, EngineConfig::default()),
        Engine::new(b, EngineConfig::default()),
    ];
    let env = Env {
        engines: engines.clone(),
        contenders: Arc::new(move |key| {
            let mut redis = inspect.clone();
            Box::pin(async move { count_contenders(&mut redis, &key).await })
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
    let redis = Redis::start().expect("start Redis (apt-get install -y redis-server redis-tools)");
    let url = redis.url();
    let trials = conformance::cases::<RedisBackend>()
        .into_iter()
        .map(|case| {
            let url = url.clone();
            Trial::test(case.name, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(run_case(url, case))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // `exit` skips destructors: stop Redis first.
    drop(redis);
    conclusion.exit();
}
