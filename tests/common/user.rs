//! RabbitMQ users of one test, for permission faults.

use std::process::Command;

use uuid::Uuid;

/// A RabbitMQ user of this test only, deleted on drop.
pub struct TestUser {
    pub name: String,
    pub password: String,
}

/// Runs `rabbitmqctl` with `args`, which must succeed; returns what it printed.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl TestUser {
    /// A user that may configure and read everything and write everything except
    /// exchanges and queues whose name ends in `.denied`.
    pub fn without_write_on_denied() -> TestUser {
        let name = super::unique_name("user");
        let password = Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &name, &password]);
        let user = TestUser { name, password };
        user.allow_late();
        user
    }

    /// Takes write away on exchanges whose name ends in `.late` too.
    pub fn revoke_late(&self) {
        self.write(r"^(?!.*\.(denied|late)$).*");
    }

    /// Gives write on exchanges whose name ends in `.late` back (`.denied` stays denied).
    pub fn allow_late(&self) {
        self.write(r"^(?!.*\.denied$).*");
    }

    /// Sets the user's permissions: configure and read everything, write what `regex` says.
    fn write(&self, regex: &str) {
        rabbitmqctl(&["set_permissions", "-p", "/", &self.name, ".*", regex, ".*"]);
    }

    /// Deletes the user (the broker closes its connections); [`TestUser::restore`] brings
    /// it back with the same password and full permissions.
    pub fn delete(&self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }

    pub fn restore(&self) {
        rabbitmqctl(&["add_user", &self.name, &self.password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &self.name, ".*", ".*", ".*"]);
    }

    pub fn amqp_url(&self) -> String {
        self.amqp_url_via("127.0.0.1:5672".parse().expect("address"))
    }

    /// How many channels this user has open on the broker.
    pub fn channels(&self) -> usize {
        rabbitmqctl(&["list_channels", "-q", "--no-table-headers", "user"])
            .lines()
            .filter(|l| l.trim() == self.name)
            .count()
    }

    /// An AMQP URL for this user to `addr` (a proxy in front of the broker).
    pub fn amqp_url_via(&self, addr: std::net::SocketAddr) -> String {
        format!("amqp://{}:{}@{addr}/%2f", self.name, self.password)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}
