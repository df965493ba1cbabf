//! PostgreSQL topologies beyond the single local server: a TLS-only cluster (right CA,
//! wrong CA, client certificates), permanent connection faults seen by the real binary,
//! a primary with a synchronous standby that takes over mid-stream, PgBouncer in
//! transaction mode.
//! Each test starts its own cluster with `scripts/topology/*` and drops it afterwards (a
//! Drop guard, so also on failure). Heavy: every test is `#[ignore]`, run serially with
//! `cargo test --test topology_pg -- --ignored --test-threads=1`.

mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use courier::{
    config::{DatabaseConfig, SecretUrl},
    Store, StoreError,
};
use diesel::QueryableByName;

/// A topology started by a script in `scripts/topology/`, stopped on drop.
struct Topology {
    script: PathBuf,
    args: Vec<String>,
}

impl Topology {
    /// Runs `<script> start <args>`; panics (after stopping it) if that fails.
    fn start(script: &str, args: &[String]) -> Topology {
        let topology = Topology {
            script: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("scripts/topology")
                .join(script),
            args: args.to_vec(),
        };
        let out = topology.run("start");
        assert!(
            out.status.success(),
            "{script} start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        topology
    }

    fn run(&self, cmd: &str) -> std::process::Output {
        Command::new(&self.script)
            .arg(cmd)
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .expect("run topology script")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let out = self.run("stop");
        if !out.status.success() {
            eprintln!("stop failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// A port nobody listens on, from the range kept for test clusters.
fn free_port() -> u16 {
    let start = 5440 + (std::process::id() % 20) as u16;
    (0..40)
        .map(|i| 5440 + (start - 5440 + i) % 40)
        .find(|p| {
            std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && !std::path::Path::new(&format!("/var/run/postgresql/.s.PGSQL.{p}")).exists()
        })
        .expect("a free port in 5440..5480")
}

/// A TLS-only cluster and the folder with its certificates.
struct TlsCluster {
    port: u16,
    dir: PathBuf,
    _topology: Topology,
}

impl TlsCluster {
    fn start() -> TlsCluster {
        let port = free_port();
        let name = format!("courier_tls_{}_{port}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let topology = Topology::start(
            "pg-tls",
            &[name, port.to_string(), dir.display().to_string()],
        );
        TlsCluster {
            port,
            dir,
            _topology: topology,
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A URL for `user@host` with extra query parameters.
    fn url(&self, user_host: &str, query: &str) -> SecretUrl {
        SecretUrl::new(format!(
            "postgres://{user_host}:{}/postgres?{query}",
            self.port
        ))
    }

    fn database(&self, url: SecretUrl) -> DatabaseConfig {
        DatabaseConfig {
            url,
            schema: common::unique_name("topo"),
            connect_timeout: Duration::from_secs(10),
            pool_size: 2,
            ..DatabaseConfig::default()
        }
    }
}

#[derive(QueryableByName)]
struct SslRow {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ssl: bool,
    #[diesel(sql_type = diesel::sql_types::Text)]
    who: String,
}

/// Migrates (one dedicated connection), opens the pool and asks the server whether this
/// session is encrypted and as whom.
async fn session(cfg: &DatabaseConfig) -> Result<SslRow, StoreError> {
    use diesel_async::RunQueryDsl;
    courier::migrate(&cfg.url, &cfg.schema, cfg.connect_timeout).await?;
    let store = Store::connect(cfg).await?;
    store.stats().await?;
    let mut conn = store.conn().await?;
    let row = diesel::sql_query(
        "SELECT ssl, current_user::text AS who FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .get_result::<SslRow>(&mut conn)
    .await?;
    Ok(row)
}

fn rejected(result: Result<impl Sized, StoreError>) -> String {
    match result {
        Err(e @ StoreError::Rejected { .. }) => {
            assert!(!e.is_transient(), "{e}");
            e.to_string()
        }
        Err(e) => panic!("expected a permanent refusal, got {e:?}"),
        Ok(_) => panic!("expected a permanent refusal, got a connection"),
    }
}

#[tokio::test]
#[ignore = "topology: starts its own PostgreSQL cluster"]
async fn tls_only_cluster_verify_full_client_certificates_and_refusals() {
    common::init_logs();
    let c = TlsCluster::start();
    let ca = c.file("ca.crt");

    // verify-full with the right CA, on the name and on the address the certificate holds.
    for host in ["localhost", "127.0.0.1"] {
        let cfg = c.database(c.url(
            &format!("postgres@{host}"),
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ));
        let row = session(&cfg).await.expect("verify-full session");
        assert!(row.ssl, "the session is encrypted");
    }
    // libpq's default, prefer, encrypts too (no certificate check).
    let row = session(&c.database(c.url("postgres@localhost", "")))
        .await
        .expect("prefer session");
    assert!(row.ssl);

    // A client certificate: `certuser` is let in by `cert clientcert=verify-full` only.
    let with_cert = format!(
        "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        c.file("client.crt"),
        c.file("client.key")
    );
    let row = session(&c.database(c.url("certuser@localhost", &with_cert)))
        .await
        .expect("client certificate session");
    assert_eq!((row.ssl, row.who.as_str()), (true, "certuser"));
    let msg = rejected(
        Store::connect(&c.database(c.url(
            "certuser@localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        )))
        .await,
    );
    assert!(
        msg.contains("certificate") || msg.contains("Certificate"),
        "{msg}"
    );
    // A client certificate the server's CA did not sign: with TLS 1.3 the server's alert
    // comes after the client's side of the handshake is done, yet it is a refusal, at once.
    let started = Instant::now();
    let msg = rejected(
        Store::connect(&c.database(c.url(
            "certuser@localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
                c.file("stranger.crt"),
                c.file("stranger.key")
            ),
        )))
        .await,
    );
    assert!(msg.contains("UnknownCA"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5), "no retries");

    // A wrong CA: the handshake's reason is in the message, not just "TLS handshake".
    let started = Instant::now();
    let msg = rejected(
        Store::connect(&c.database(c.url(
            "postgres@localhost",
            &format!("sslmode=verify-full&sslrootcert={}", c.file("wrong-ca.crt")),
        )))
        .await,
    );
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5), "no retries");
    // verify-ca ignores the name, verify-full does not: `127.0.0.2` is not in the SAN.
    let mut cfg = c.database(c.url("postgres@localhost", ""));
    cfg.url = SecretUrl::new(format!(
        "postgres://postgres@127.0.0.2:{}/postgres?sslmode=verify-ca&sslrootcert={ca}&hostaddr=127.0.0.1",
        c.port
    ));
    session(&cfg)
        .await
        .expect("verify-ca ignores the host name");
    cfg.url = SecretUrl::new(format!(
        "postgres://postgres@127.0.0.2:{}/postgres?sslmode=verify-full&sslrootcert={ca}&hostaddr=127.0.0.1",
        c.port
    ));
    let msg = rejected(Store::connect(&cfg).await);
    assert!(msg.contains("not valid for name \"127.0.0.2\""), "{msg}");

    // The server takes TLS only: a plain session is refused for good, with pg_hba's reason.
    let msg =
        rejected(Store::connect(&c.database(c.url("postgres@localhost", "sslmode=disable"))).await);
    assert!(msg.contains("no encryption"), "{msg}");
}

/// `courier run` against `url`: it must exit 1 within `secs`, its stderr naming `needle`.
async fn run_exits_1_naming(url: &SecretUrl, secs: u64, needle: &str) {
    run_with_env_exits_1_naming(url, &[], secs, needle).await
}

/// [`run_exits_1_naming`] with more variables in the engine's environment.
async fn run_with_env_exits_1_naming(
    url: &SecretUrl,
    more: &[(&str, String)],
    secs: u64,
    needle: &str,
) {
    let mut env = vec![
        ("COURIER_DATABASE_URL", url.expose().to_string()),
        ("COURIER_DATABASE_SCHEMA", common::unique_name("topo")),
        ("COURIER_DATABASE_CONNECT_TIMEOUT", "5s".into()),
        ("COURIER_DATABASE_WAIT_AT_START", "true".into()),
        ("COURIER_BROKER_URL", common::broker_url()),
    ];
    env.extend(more.iter().cloned());
    let mut engine = common::EngineProcess::spawn("topology-refusal", &env);
    let status = engine.wait(secs).await;
    let log = engine.log();
    assert_eq!(status.code(), Some(1), "exit status; log:\n{log}");
    assert!(log.contains(needle), "the log names `{needle}`:\n{log}");
    assert!(
        !log.contains("right-password") && !log.contains("wrong-password"),
        "{log}"
    );
}

#[tokio::test]
#[ignore = "topology: starts its own PostgreSQL cluster"]
async fn permanent_refusals_end_the_binary_at_once_with_the_cause() {
    common::init_logs();
    let c = TlsCluster::start();
    let ca = c.file("ca.crt");
    // Even with wait_at_start, a wrong CA, a missing database and a wrong password are
    // not waited out.
    run_exits_1_naming(
        &c.url(
            "postgres@localhost",
            &format!("sslmode=verify-full&sslrootcert={}", c.file("wrong-ca.crt")),
        ),
        15,
        "UnknownIssuer",
    )
    .await;
    run_exits_1_naming(
        &SecretUrl::new(format!(
            "postgres://postgres@localhost:{}/no_such_db?sslmode=verify-full&sslrootcert={ca}",
            c.port
        )),
        15,
        "\"no_such_db\" does not exist",
    )
    .await;
    run_exits_1_naming(
        &c.url(
            "pwuser:wrong-password@localhost",
            &format!("sslrootcert={ca}"),
        ),
        15,
        "password authentication failed",
    )
    .await;
    // libpq's PGSSLMODE, not the URL, turned TLS off: the server's refusal says so, since
    // the URL the message shows has no `sslmode`.
    run_with_env_exits_1_naming(
        &c.url("postgres@localhost", ""),
        &[("PGSSLMODE", "disable".into())],
        15,
        "no encryption (TLS set by the environment, not the URL: PGSSLMODE=disable)",
    )
    .await;
    // The right password gets in (the refusal above was about the password).
    let row = session(&c.database(c.url(
        "pwuser:right-password@localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    )))
    .await
    .expect("scram session");
    assert_eq!(row.who, "pwuser");
}

/// A primary and its synchronous standby, dropped on drop.
struct StandbyPair {
    primary_port: u16,
    standby_port: u16,
    topology: Topology,
}

impl StandbyPair {
    fn start() -> StandbyPair {
        let primary_port = free_port();
        // Claim the primary's port before looking for the standby's.
        let hold = std::net::TcpListener::bind(("127.0.0.1", primary_port)).expect("hold port");
        let standby_port = free_port();
        drop(hold);
        let tag = format!("{}_{primary_port}", std::process::id());
        let topology = Topology::start(
            "pg-standby",
            &[
                format!("courier_pri_{tag}"),
                format!("courier_stb_{tag}"),
                primary_port.to_string(),
                standby_port.to_string(),
            ],
        );
        StandbyPair {
            primary_port,
            standby_port,
            topology,
        }
    }

    /// libpq's multi-host URL over both, writable server only.
    fn url(&self) -> SecretUrl {
        SecretUrl::new(format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&sslmode=disable",
            self.primary_port, self.standby_port
        ))
    }

    /// The standby alone (read-only while the primary lives).
    fn standby_url(&self) -> SecretUrl {
        SecretUrl::new(format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.standby_port
        ))
    }

    /// Stops the primary (fast: commits waiting for the standby are cut off) and promotes
    /// the standby.
    fn fail_over(&self) {
        let out = self.topology.run("failover");
        assert!(
            out.status.success(),
            "failover: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[actix_rt::test]
#[ignore = "topology: starts a primary and a synchronous standby"]
async fn primary_failover_mid_stream_loses_nothing() {
    use common::{audit::audit, broker::TestBroker, events::confirmed_at_least};
    use courier::{Engine, OutboxMessage, Status};
    use std::sync::{Arc, Mutex};

    common::init_logs();
    let pair = StandbyPair::start();
    // The standby alone is refused at once, by name: neither migrated nor waited out.
    let refused = courier::migrate(&pair.standby_url(), "standby_only", Duration::from_secs(10))
        .await
        .expect_err("a standby takes no writes");
    assert!(refused.to_string().contains("is a standby"), "{refused}");
    run_exits_1_naming(&pair.standby_url(), 15, "is a standby").await;
    let schema = common::unique_name("failover");
    let mut config = courier::config::Config::default();
    config.database.url = pair.url();
    config.database.schema = schema.clone();
    config.database.connect_timeout = Duration::from_secs(5);
    courier::migrate(&config.database.url, &schema, Duration::from_secs(10))
        .await
        .expect("migrate");
    let broker = TestBroker::new("failover").await;
    config.broker.url = SecretUrl::new(common::broker_url()).into();
    // The schema lives in the pair, not in the shared database; TestDb only carries it.
    let db = common::TestDb { schema, config };
    let mut engine_config = db.engine_config();
    // Rows whose claim committed while the engine saw the connection die are rescued
    // when their lease lapses: keep that short.
    engine_config.scheduler.lease_duration = Duration::from_secs(3);
    engine_config.retry.max_attempts = 50;
    let engine = Engine::start(engine_config).await.expect("engine");
    let mut events = engine.subscribe();

    // A producer commits batches of 20 until told to stop; a batch whose commit fails
    // (ambiguous or refused) is not counted: it may or may not be in.
    let committed = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed_batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let (store, committed, stop, failed) = (
            Store::connect(&db.config.database)
                .await
                .expect("producer store"),
            committed.clone(),
            stop.clone(),
            failed_batches.clone(),
        );
        let exchange = broker.exchange.clone();
        actix_rt::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let batch: Vec<OutboxMessage> = (0..20)
                    .map(|_| {
                        i += 1;
                        OutboxMessage::new(&exchange, format!("routed.{i}"), b"x".to_vec())
                    })
                    .collect();
                match store.enqueue_many(&batch).await {
                    Ok(()) => committed
                        .lock()
                        .expect("ids")
                        .extend(batch.iter().map(|m| m.id)),
                    Err(_) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                // No pause: a commit is nearly always waiting for the standby when the
                // primary stops, so the stop cuts one off (an ambiguous commit).
                tokio::task::yield_now().await;
            }
        })
    };

    confirmed_at_least(&mut events, 1_000).await;
    let before = engine.counters().confirmed;
    let mut after = engine.subscribe();
    let failover_at = Instant::now();
    pair.fail_over();
    let promoted_after = failover_at.elapsed();
    // Delivery resumes on the new primary.
    let resumed = common::eventually(120, "confirmations on the promoted standby", || {
        let now = engine.counters().confirmed;
        async move { (now > before + 500).then(|| failover_at.elapsed()) }
    })
    .await;
    // LISTEN is back too, on the new primary, and its self-check NOTIFY arrives.
    common::events::wait_event(&mut after, 60, "LISTEN on the promoted standby", |e| {
        matches!(e, courier::EngineEvent::ListenerReady { receiving: true })
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.await.expect("producer");
    let ids = committed.lock().expect("ids").clone();
    engine
        .wait_for_all(&ids, Duration::from_secs(180))
        .await
        .expect("every committed row settles on the new primary");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    // Nothing left behind, ambiguous batches included.
    let store = Store::connect(&db.config.database).await.expect("store");
    let stats = common::eventually(60, "no row in flight or retrying", || {
        let store = store.clone();
        async move {
            let s = store.stats().await.ok()?;
            (s.count(Status::InFlight) == 0
                && s.count(Status::Retrying) == 0
                && s.count(Status::Pending) == 0)
                .then_some(s)
        }
    })
    .await;
    eprintln!(
        "failover: {} committed, {} batches failed (ambiguous/refused), {} duplicates received, \
         standby promoted {promoted_after:?} after the stop, 500 more confirmed {resumed:?} after it, \
         {} failed claim rounds; {stats:?}",
        ids.len(),
        failed_batches.load(std::sync::atomic::Ordering::SeqCst),
        a.duplicates,
        engine.counters().claim_failures
    );
    engine.shutdown().await;
}

/// `courier migrate` with these `COURIER_*` overrides; its exit status and output.
fn migrate_process(env: &[(&str, String)]) -> std::process::Output {
    common::courier_command()
        .arg("migrate")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run courier migrate")
}

#[actix_rt::test]
#[ignore = "topology: starts PgBouncer in transaction mode"]
async fn behind_pgbouncer_in_transaction_mode() {
    use common::{audit::audit, broker::TestBroker};
    use courier::{config::Pooler, Engine, OutboxMessage, Status};

    common::init_logs();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("courier_bouncer_{}_{port}", std::process::id()));
    let _bouncer = Topology::start(
        "pgbouncer",
        &[port.to_string(), "5432".into(), dir.display().to_string()],
    );
    let schema = common::unique_name("bouncer");
    let bouncer_url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");

    // Migrate twice through PgBouncer (no direct URL): the second run finds nothing to do.
    let env = [
        ("COURIER_DATABASE_URL", bouncer_url.clone()),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
        ("COURIER_DATABASE_POOLER", "transaction".to_string()),
    ];
    // The audit reads the schema straight from PostgreSQL; dropped on drop.
    let mut direct = courier::config::Config::default();
    direct.database.url = SecretUrl::new(common::database_url());
    direct.database.schema = schema.clone();
    direct.broker.url = SecretUrl::new(common::broker_url()).into();
    let db = common::TestDb {
        schema: schema.clone(),
        config: direct,
    };
    for (run, expect) in [(1, "migration(s) applied"), (2, "is up to date")] {
        let out = migrate_process(&env);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "migrate run {run}: {text}");
        assert!(text.contains(expect), "migrate run {run}: {text}");
    }

    // `courier doctor` through the pooler with LISTEN left on: the NOTIFY never arrives, and
    // the fix names only what is left to set (it once suggested the pooler setting, already set).
    let out = common::courier_command()
        .arg("doctor")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("COURIER_BROKER_URL", common::broker_url())
        .output()
        .expect("run courier doctor");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "doctor: {report}");
    assert!(
        report.contains("set database.listen: false too")
            && !report.contains("and database.pooler: transaction"),
        "doctor's notify fix behind the pooler: {report}"
    );

    // database.migrate_url takes migrations around the pooler: straight to PostgreSQL they
    // find nothing to do, and a URL nobody answers on is the one that fails.
    let direct_env = |url: String| {
        let mut env = env.to_vec();
        env.push(("COURIER_DATABASE_MIGRATE_URL", url));
        env
    };
    let out = migrate_process(&direct_env(common::database_url()));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("is up to date"),
        "migrate through migrate_url: {out:?}"
    );
    let closed = free_port();
    let out = migrate_process(&direct_env(format!(
        "postgres://postgres@127.0.0.1:{closed}/postgres?connect_timeout=2"
    )));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("127.0.0.1:{closed}")),
        "migrate_url is the URL migrations use: {stderr}"
    );

    let broker = TestBroker::new("bouncer").await;
    let mut config = db.engine_config();
    config.database.url = SecretUrl::new(bouncer_url);
    config.database.pooler = Pooler::Transaction;
    config.database.listen = false;
    config.database.auto_migrate = true;
    // Two engines started at the same instant share the pooler's server connections from
    // their first statement on (an audit once saw one of them fail its start).
    // The first engine serves the admin API through PgBouncer too: its statement timeout is
    // set per transaction, so PgBouncer's default `ignore_startup_parameters` (no
    // `options`) lets it connect, and the timeout holds.
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut with_admin = config.clone();
    with_admin.admin.bind = Some(admin_addr.clone());
    with_admin.admin.statement_timeout = Duration::from_secs(1);
    let (engine, second) = tokio::join!(Engine::start(with_admin), Engine::start(config.clone()));
    let engine = engine.expect("engine behind PgBouncer");
    let second = second.expect("a second engine started beside it");
    let producer = Store::connect(&config.database)
        .await
        .expect("producer store");
    let started = Instant::now();
    let mut ids = Vec::new();
    for batch in 0..10 {
        let rows: Vec<OutboxMessage> = (0..1_000)
            .map(|i| {
                OutboxMessage::new(
                    &broker.exchange,
                    format!("routed.{batch}.{i}"),
                    b"x".to_vec(),
                )
            })
            .collect();
        producer
            .enqueue_many(&rows)
            .await
            .expect("enqueue through PgBouncer");
        ids.extend(rows.iter().map(|m| m.id));
    }
    engine
        .wait_for_all(&ids, Duration::from_secs(180))
        .await
        .expect("10,000 rows settle behind PgBouncer");
    let bulk = started.elapsed();

    // Trickle: one row at a time, each awaited; without LISTEN the poll finds it.
    let mut latencies = Vec::new();
    for i in 0..20 {
        let m = OutboxMessage::new(
            &broker.exchange,
            format!("routed.trickle.{i}"),
            b"t".to_vec(),
        );
        let at = Instant::now();
        producer.enqueue(&m).await.expect("enqueue one");
        engine
            .wait_for_all(&[m.id], Duration::from_secs(30))
            .await
            .expect("trickle row settles");
        latencies.push(at.elapsed());
        ids.push(m.id);
    }
    latencies.sort();
    let (p50, max) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );

    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    for counters in [engine.counters(), second.counters()] {
        assert_eq!(
            counters.claim_failures, 0,
            "no claim failed behind PgBouncer"
        );
        assert_eq!(counters.retried, 0, "no row went back to retrying");
    }
    let stats = db.store().await.stats().await.expect("stats");
    assert_eq!(stats.count(Status::InFlight), 0);
    assert_eq!(stats.count(Status::Retrying), 0);
    assert!(
        max < config.scheduler.sweep_interval + Duration::from_secs(1),
        "trickle latency without LISTEN: max {max:?}"
    );
    eprintln!(
        "pgbouncer: 10,000 rows in {bulk:?}, {} duplicates; trickle p50 {p50:?}, max {max:?} (sweep {:?})",
        a.duplicates, config.scheduler.sweep_interval
    );

    let (status, body) = common::http(&admin_addr, "GET", "/api/stats", None).await;
    assert_eq!(status, 200, "admin API behind PgBouncer: {body}");
    // A table lock held elsewhere: the admin statement ends at its 1 s timeout.
    let mut holder = db.raw().await;
    {
        use diesel_async::SimpleAsyncConnection;
        holder
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE \"{schema}\".outbox IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .expect("lock the outbox");
        let (status, body) = common::within(
            10,
            "the admin statement timeout behind PgBouncer",
            common::http(&admin_addr, "GET", "/api/stats", None),
        )
        .await;
        assert_eq!(status, 503, "{body}");
        holder.batch_execute("ROLLBACK").await.expect("rollback");
    }
    engine.shutdown().await;
    second.shutdown().await;
}
