//! A TCP proxy inside the test, between the engine and RabbitMQ or PostgreSQL (no Docker
//! here): it can stall the server-to-client direction (confirms and heartbeats stop
//! arriving), throttle the client-to-server direction (a slow uplink), cut every
//! connection, and refuse new ones (the server looks down). It runs on its own thread and
//! runtime, so it keeps working whatever the test's runtime is doing.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

struct Shared {
    stalled: watch::Sender<bool>,
    delay_ms: AtomicU64,
    up_bytes_per_sec: AtomicU64,
    generation: watch::Sender<u64>,
    connections: AtomicU64,
    refusing: AtomicBool,
    refused: AtomicU64,
}

/// See the module documentation.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        Self::start_on(0, upstream)
    }

    /// Listens on 127.0.0.1:`port` (0: any free port) and forwards to `upstream`.
    pub fn start_on(port: u16, upstream: SocketAddr) -> Proxy {
        let (stalled, _) = watch::channel(false);
        let (generation, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            stalled,
            delay_ms: AtomicU64::new(0),
            up_bytes_per_sec: AtomicU64::new(0),
            generation,
            connections: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        });
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let s = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if s.refusing.load(Ordering::SeqCst) {
                        s.refused.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    s.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(pipe(client, server, s.clone()));
                }
            });
        });
        Proxy { addr, shared }
    }

    /// A port nothing listens on right now (for "not reachable yet" tests).
    pub fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    /// An AMQP URL through the proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Stops (true) or resumes (false) forwarding from the broker to the client.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.send_replace(on);
    }

    /// Delays every chunk from the broker by `ms` milliseconds (0: no delay).
    pub fn delay(&self, ms: u64) {
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Limits the client-to-broker direction to about `bytes_per_sec` (0: no limit).
    pub fn throttle_up(&self, bytes_per_sec: u64) {
        self.shared
            .up_bytes_per_sec
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Closes every open connection (new ones are accepted).
    pub fn cut(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// While on, closes every new connection at once, as if the server were down (combine
    /// with [`cut`](Self::cut) for the open ones); off: forwards again.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Connections closed at once because the proxy was refusing.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

async fn pipe(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut gen = shared.generation.subscribe();
    gen.borrow_and_update();
    let mut stalled = shared.stalled.subscribe();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
            // A slow uplink: each chunk takes the time it would at the configured rate.
            let rate = shared.up_bytes_per_sec.load(Ordering::SeqCst);
            if rate > 0 {
                let secs = n as f64 / rate as f64;
                tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while *stalled.borrow_and_update() {
                if stalled.changed().await.is_err() {
                    return;
                }
            }
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = shared.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            // Hold data read just before a stall until the stall ends.
            while *stalled.borrow_and_update() {
                if stalled.changed().await.is_err() {
                    return;
                }
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = gen.changed() => {}
    }
}
