//! PostgreSQL topologies beyond the single local server: a TLS-only cluster (right CA,
//! wrong CA, client certificates), permanent connection faults seen by the real binary.
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
    store::{self, Store, StoreError},
};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

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
    store::migrate(&cfg.url, &cfg.schema, cfg.connect_timeout).await?;
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
    let mut engine = common::EngineProcess::spawn(
        "topology-refusal",
        &[
            ("COURIER_DATABASE_URL", url.expose().to_string()),
            ("COURIER_DATABASE_SCHEMA", common::unique_name("topo")),
            ("COURIER_DATABASE_CONNECT_TIMEOUT", "5s".into()),
            ("COURIER_DATABASE_WAIT_AT_START", "true".into()),
            ("COURIER_BROKER_URL", common::broker_url()),
        ],
    );
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
    // The right password gets in (the refusal above was about the password).
    let row = session(&c.database(c.url(
        "pwuser:right-password@localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    )))
    .await
    .expect("scram session");
    assert_eq!(row.who, "pwuser");
}
