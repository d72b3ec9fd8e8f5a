//! Runs the conformance suite on the PostgreSQL backend: one real
//! PostgreSQL 15 (Debian's package, via `clastor-testkit`) for the whole
//! run, and per case two engines over two separate `PostgresBackend`s — two
//! "servers" sharing the database — so cross-server exclusion is exercised
//! by every case that spreads sessions over the engines.
//!
//! A libtest-mimic harness (`harness = false`): PostgreSQL starts once, each
//! case is a named test, and the usual test-binary arguments apply.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use clastor::backend::postgres::{PgConfig, PostgresBackend};
use clastor::{Engine, EngineConfig, LockKey};
use clastor_testkit::Postgres;
use conformance::Env;
use libtest_mimic::{Arguments, Failed, Trial};
use tokio_postgres::NoTls;

const SCHEMA: &str = "conformance";

fn config(url: &str) -> PgConfig {
    PgConfig {
        url: url.to_owned(),
        schema: SCHEMA.to_owned(),
        connections: 2,
        ttl: Duration::from_secs(6),
        ..PgConfig::default()
    }
}

/// Holder plus waiters of `key`: its rows under the kind's current version.
async fn count_contenders(db: &tokio_postgres::Client, key: &LockKey) -> usize {
    let sql = format!(
        "SELECT count(*) FROM {SCHEMA}.contenders c
          WHERE c.kind = $1 AND c.id = $2
            AND c.version = coalesce((SELECT split_part(k.record, E'\\n', 1) FROM {SCHEMA}.kinds k WHERE k.kind = $1), 'v1')"
    );
    let row = db
        .query_one(&sql, &[&key.kind(), &key.id()])
        .await
        .unwrap_or_else(|e| panic!("count contenders of {key}: {e}"));
    usize::try_from(row.get::<_, i64>(0)).unwrap()
}

async fn run_case(url: String, case: conformance::Case<PostgresBackend>) -> Result<(), Failed> {
    let a = PostgresBackend::connect(config(&url))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let b = PostgresBackend::connect(config(&url))
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let (inspect, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    tokio::spawn(connection);
    let inspect = Arc::new(inspect);
    let engines = vec![
        Engine::new(a, EngineConfig::default()),
        Engine::new(b, EngineConfig::default()),
    ];
    let env = Env {
        engines: engines.clone(),
        contenders: Arc::new(move |key| {
            let db = inspect.clone();
            Box::pin(async move { count_contenders(&db, &key).await })
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
    let postgres = Postgres::start().expect("start PostgreSQL (apt-get install -y postgresql)");
    let url = postgres.url();
    let trials = conformance::cases::<PostgresBackend>()
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
    // `exit` skips destructors: stop PostgreSQL first.
    drop(postgres);
    conclusion.exit();
}
