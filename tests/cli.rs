//! The `courier` binary: help, exit codes, config errors, migrate and status.

mod common;

use std::process::{Command, Output};

fn courier(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run courier")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_explains_every_command() {
    let o = courier(&["--help"], &[]);
    assert!(o.status.success());
    let t = text(&o);
    for cmd in ["run", "migrate", "status"] {
        assert!(t.contains(cmd), "{t}");
    }
    let o = courier(&["migrate", "--help"], &[]);
    assert!(o.status.success());
    assert!(text(&o).contains("--config"));
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(courier(&["frobnicate"], &[]).status.code(), Some(2));
}

#[test]
fn bad_config_exits_2_and_names_the_key() {
    let dir = std::env::temp_dir().join(common::unique_name("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, "retry:\n  max_attempts: 0\n").unwrap();
    let o = courier(&["status", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("retry.max_attempts"), "{}", text(&o));
    let o = courier(&["--config", "/nonexistent/courier.yaml", "status"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("/nonexistent/courier.yaml"));
}

#[test]
fn unreachable_database_names_host_without_password_and_exits_1() {
    let o = courier(
        &["migrate"],
        &[
            (
                "COURIER_DATABASE_URL",
                "postgres://bob:hunter2@127.0.0.1:1/nowhere",
            ),
            ("COURIER_DATABASE_CONNECT_TIMEOUT", "2s"),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("127.0.0.1:1"), "{t}");
    assert!(!t.contains("hunter2"), "{t}");
}

#[test]
fn migrate_twice_then_status() {
    let schema = common::unique_name("climigrate");
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let first = courier(&["migrate"], &env);
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("applied"));
    let second = courier(&["migrate"], &env);
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("up to date"), "{}", text(&second));
    let status = courier(&["status"], &env);
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("pending"));
    // Clean up through the test schema guard.
    drop(common::TestDbGuard(schema));
}
