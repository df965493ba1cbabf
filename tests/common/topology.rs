//! Extra RabbitMQ nodes for the topology tests, started and stopped through
//! `scripts/topology/*` (own node names, ports, data folders and Erlang cookie: the main
//! node is never touched). A guard stops every node and removes its folder on drop, even
//! when the test fails.

use std::{path::PathBuf, process::Stdio};

/// A script of `scripts/topology/`.
fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/topology")
        .join(name)
}

/// Runs a topology script to the end (async, so an engine on this thread keeps running).
pub async fn run_script(name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(script(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run topology script");
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One extra node: short name, AMQP port, distribution port.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub port: u16,
    pub dist: u16,
}

impl Node {
    fn spec(&self) -> String {
        format!("{}:{}:{}", self.name, self.port, self.dist)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// Extra nodes sharing one folder and cookie (a cluster, or a single node).
pub struct Topology {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// One more free port after the nodes' AMQP ports (a TLS listener's).
    pub spare_port: u16,
}

/// The first `base` from `preferred` on (in steps of 10) at which `n` AMQP ports and their
/// distribution ports (`+ 20000`) are all free: another process here (a RabbitMQ node of
/// someone else's, a service) must not make the test fail or talk to the wrong node.
fn free_base(preferred: u16, n: u16) -> u16 {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    (0..200u16)
        .map(|step| preferred + step * 10)
        .find(|base| (0..n).all(|i| free(base + i) && free(base + 20_000 + i)))
        .expect("no free ports for the topology")
}

impl Topology {
    /// `n` nodes named `courier-<tag><i>`, ports from `base` (AMQP) and `base + 20000`
    /// (distribution) or the first free ones after them, joined in one cluster when
    /// `n > 1`.
    pub async fn cluster(tag: &str, base: u16, n: usize) -> Topology {
        let topology = Topology::empty(tag, base, n);
        let mut args = vec!["start".to_string(), topology.dir.display().to_string()];
        args.extend(topology.nodes.iter().map(Node::spec));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_script("rabbit-cluster", &args).await;
        topology
    }

    /// The guard alone (nothing started yet): for nodes with their own configuration.
    pub fn empty(tag: &str, base: u16, n: usize) -> Topology {
        let dir = std::env::temp_dir().join(format!("courier-topology-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("topology dir");
        let base = free_base(base, n as u16 + 1);
        let nodes = (0..n)
            .map(|i| Node {
                name: format!("courier-{tag}{}", i + 1),
                port: base + i as u16,
                dist: base + 20_000 + i as u16,
            })
            .collect();
        Topology {
            dir,
            nodes,
            spare_port: base + n as u16,
        }
    }

    fn dir_arg(&self) -> String {
        self.dir.display().to_string()
    }

    /// Graceful stop of node `i` (`rabbitmqctl stop`).
    pub async fn stop(&self, i: usize) {
        run_script(
            "rabbit-node",
            &["stop", &self.nodes[i].name, &self.dir_arg()],
        )
        .await;
    }

    /// `kill -9` of node `i`'s VM.
    pub async fn kill(&self, i: usize) {
        run_script(
            "rabbit-node",
            &["kill", &self.nodes[i].name, &self.dir_arg()],
        )
        .await;
    }

    /// Starts node `i` again (it rejoins its cluster), optionally with extra config.
    pub async fn start(&self, i: usize, extra_conf: Option<&str>) {
        let n = &self.nodes[i];
        let (port, dist) = (n.port.to_string(), n.dist.to_string());
        let mut args = vec!["start", &n.name, &port, &dist];
        let dir = self.dir_arg();
        args.push(&dir);
        if let Some(extra) = extra_conf {
            args.push(extra);
        }
        run_script("rabbit-node", &args).await;
    }

    /// `rabbitmqctl ARGS` against node `i`, with the topology's own cookie.
    pub async fn ctl(&self, i: usize, args: &[&str]) {
        let dir = self.dir_arg();
        let mut all = vec!["ctl", self.nodes[i].name.as_str(), dir.as_str()];
        all.extend(args);
        run_script("rabbit-node", &all).await;
    }

    /// `rabbitmqctl list_queues -q name COLUMN`'s line for `queue`, asked of the first node
    /// that answers, split into its fields after the name.
    async fn queue_fields(&self, queue: &str, column: &str) -> Option<Vec<String>> {
        for node in &self.nodes {
            let Ok(out) = tokio::process::Command::new(script("rabbit-node"))
                .args(["ctl", &node.name, &self.dir_arg(), "list_queues", "-q"])
                .args(["name", column])
                .output()
                .await
            else {
                continue;
            };
            if !out.status.success() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(queue))?;
            return Some(line.split_whitespace().skip(1).map(String::from).collect());
        }
        None
    }

    /// How many members of quorum queue `queue` are online (asked of the first node that
    /// answers). A node that was restarted counts only once its member has recovered.
    pub async fn quorum_online(&self, queue: &str) -> usize {
        self.queue_fields(queue, "online")
            .await
            .map_or(0, |f| f.concat().matches("@localhost").count())
    }

    /// Which node leads quorum queue `queue` (asked of the first node that answers).
    pub async fn quorum_leader(&self, queue: &str) -> Option<usize> {
        let leader = self
            .queue_fields(queue, "leader")
            .await?
            .into_iter()
            .next()?;
        self.nodes
            .iter()
            .position(|n| leader == format!("{}@localhost", n.name))
    }

    /// Which node holds the client connection named `connection_name` (asked of the
    /// first node that answers); `None` when no node lists it.
    pub async fn node_of(&self, connection_name: &str) -> Option<usize> {
        for node in &self.nodes {
            let out = tokio::process::Command::new(script("rabbit-node"))
                .args(["ctl", &node.name, &self.dir_arg(), "list_connections", "-q"])
                .args(["port", "client_properties"])
                .output()
                .await
                .ok()?;
            if !out.status.success() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let port = text
                .lines()
                .find(|l| l.contains(connection_name))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|p| p.parse::<u16>().ok())?;
            return self.nodes.iter().position(|n| n.port == port);
        }
        None
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut args = vec!["stop".to_string(), self.dir_arg()];
        args.extend(self.nodes.iter().map(|n| n.name.clone()));
        let _ = std::process::Command::new(script("rabbit-cluster"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
