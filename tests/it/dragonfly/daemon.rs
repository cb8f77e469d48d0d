//! One dfdaemon playing one node, for the tests and the benchmark: its own ports, storage,
//! socket and logs in a directory, and the scheduler at a loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the test command installs dfdaemon (`MODELCACHE_TOOLS`, default
/// `/var/cache/modelcache-tools`).
pub fn dfdaemon_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DFDAEMON_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let tools =
        std::env::var("MODELCACHE_TOOLS").unwrap_or_else(|_| "/var/cache/modelcache-tools".into());
    let p = Path::new(&tools).join("dragonfly/1.5.10/bin/dfdaemon");
    p.exists().then_some(p)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One dfdaemon playing one node: its own ports, storage, socket and logs under `dir`.
pub struct Daemon {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    config: PathBuf,
    dynconfig: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Writes the configuration and starts the daemon; waits until its socket answers.
    /// `upload_limit` caps what it serves to peers (e.g. "20MiB"), to make a transfer last.
    pub fn start(
        bin: &Path,
        name: &str,
        dir: &Path,
        scheduler_port: u16,
        upload_limit: &str,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("dfdaemon.sock");
        let config = dir.join("dfdaemon.yaml");
        let dynconfig = dir.join("dynconfig.yaml");
        let p = |_| free_port();
        let ports: Vec<u16> = (0..8).map(p).collect();
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                "host:\n  hostname: {name}\n  ip: 127.0.0.1\n\
                 server:\n  pluginDir: {d}/plugins\n  cacheDir: {d}/cache\n\
                 download:\n  server:\n    socketPath: {socket}\n\
                 upload:\n  server:\n    ip: 127.0.0.1\n    port: {p0}\n  bandwidthLimit: {upload_limit}\n\
                 scheduler:\n  announceInterval: 1s\n  scheduleTimeout: 10s\n\
                 storage:\n  dir: {d}/storage\n  keep: true\n  server:\n    ip: 127.0.0.1\n    tcpPort: {p1}\n    quicPort: {p2}\n\
                 health:\n  server:\n    ip: 127.0.0.1\n    port: {p3}\n\
                 metrics:\n  server:\n    ip: 127.0.0.1\n    port: {p4}\n\
                 stats:\n  server:\n    ip: 127.0.0.1\n    port: {p5}\n\
                 proxy:\n  server:\n    ip: 127.0.0.1\n    port: {p6}\n\
                 gc:\n  policy:\n    diskThreshold: 20GiB\n",
                socket = socket.display(),
                p0 = ports[0],
                p1 = ports[1],
                p2 = ports[2],
                p3 = ports[3],
                p4 = ports[4],
                p5 = ports[5],
                p6 = ports[6],
            ),
        )
        .unwrap();
        std::fs::write(
            &dynconfig,
            format!("scheduler:\n  addrs:\n    - 127.0.0.1:{scheduler_port}\n"),
        )
        .unwrap();
        let mut daemon = Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            socket,
            config,
            dynconfig,
            child: None,
        };
        daemon.launch(bin);
        daemon
    }

    fn launch(&mut self, bin: &Path) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(bin)
            .arg("--config")
            .arg(&self.config)
            .arg("--dynconfig")
            .arg(&self.dynconfig)
            .arg("--log-dir")
            .arg(self.dir.join("log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dfdaemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.socket.exists()
            || std::os::unix::net::UnixStream::connect(&self.socket).is_err()
        {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "dfdaemon {} exited at start ({status}); logs: {}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dfdaemon {} did not open its socket in 60 s; logs: {}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// User + system CPU seconds the daemon has used so far (`/proc` counts in USER_HZ, 100 on
    /// Linux whatever the kernel's tick).
    #[allow(dead_code, reason = "the benchmark measures it, the tests do not")]
    pub fn cpu_seconds(&self) -> f64 {
        let Some(child) = &self.child else { return 0.0 };
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// SIGKILL, as an OOM kill or a node loss would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (SIGTERM, as the kubelet does) and starts it again on the same storage (kept:
    /// `storage.keep`).
    pub fn restart(&mut self, bin: &Path) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.launch(bin);
    }

    /// The tail of its log files, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.join("log"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        for path in names {
            let f = path.display().to_string();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("\n--- {f}\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
