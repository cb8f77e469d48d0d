//! A small fault-injecting HTTP/1.1 proxy in front of Azurite.
//!
//! Each request is forwarded on a fresh upstream connection and answered with
//! `Connection: close`, so faults never leak into the next request. Rules match ranged GETs by
//! a substring of the path and fire a limited number of times (or forever).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do to a matching request.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer 503 ServerBusy with `Retry-After: secs` without asking Azurite.
    Busy { retry_after_secs: u32 },
    /// Answer 500 OperationTimeout.
    ServerError,
    /// Send the head and half the body, then reset the connection (RST).
    ResetMidBody,
    /// Send the head and half the body, then close cleanly (a short body).
    Truncate,
    /// Send the head and half the body, then go silent for this long.
    Stall(Duration),
    /// Wait this long, then forward normally.
    Delay(Duration),
    /// Forward, but answer `200 OK` without `Content-Range`, as a server or proxy that ignores
    /// ranges would.
    NotPartial,
    /// Forward, but shift the answered `Content-Range` by one byte.
    WrongRange,
    /// Accept the request and send nothing, not even the response headers, for this long.
    SilentBeforeHeaders(Duration),
    /// Forward, but flip one bit in the middle of the body (headers, checksum included, kept).
    FlipBit,
    /// Answer 429 Too Many Requests with `Retry-After: secs`.
    TooMany { retry_after_secs: u32 },
    /// Close the connection with a reset before answering anything.
    ResetBeforeHeaders,
    /// Forward, but drop the `Content-MD5` header (a proxy or server hiccup that omits the
    /// transactional MD5 it was asked for).
    StripMd5,
    /// Forward, but send this many bytes past the asked range (`Content-Length` raised to
    /// match, `Content-Range` kept): a server that answers more than it was asked for.
    LongBody(usize),
}

impl Fault {
    /// A short name, for counts.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Busy { .. } => "503",
            Fault::ServerError => "500",
            Fault::ResetMidBody => "reset_mid_body",
            Fault::Truncate => "truncated",
            Fault::Stall(_) => "stall_mid_body",
            Fault::Delay(_) => "delay",
            Fault::NotPartial => "200_to_range",
            Fault::WrongRange => "wrong_content_range",
            Fault::SilentBeforeHeaders(_) => "stall_before_headers",
            Fault::FlipBit => "flipped_bit",
            Fault::TooMany { .. } => "429",
            Fault::ResetBeforeHeaders => "reset_before_headers",
            Fault::LongBody(_) => "long_body",
            Fault::StripMd5 => "no_content_md5",
        }
    }
}

/// Random faults on every GET (ranges, listings, the manifest) that no rule claimed.
pub struct Chaos {
    pub rng: fastrand::Rng,
    /// Chance that a request gets a fault.
    pub probability: f64,
    /// The faults to pick from, uniformly.
    pub faults: Vec<Fault>,
    /// Faults fired, by name.
    pub counts: std::collections::BTreeMap<&'static str, usize>,
}

/// A hook run once, before forwarding the first matching request.
pub type Hook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

struct Rule {
    path_contains: String,
    fault: Option<Fault>,
    hook: Option<Hook>,
    /// Matching requests to let through before the rule starts to fire.
    skip: usize,
    remaining: Option<usize>,
}

/// The proxy; dropped with the test.
pub struct FaultProxy {
    pub port: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    /// How many faults fired.
    pub fired: Arc<Mutex<usize>>,
    /// How many requests arrived.
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    /// Random faults, when set.
    pub chaos: Arc<Mutex<Option<Chaos>>>,
    /// Body bytes Azurite answered through the proxy (what the source served).
    pub body_bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl FaultProxy {
    /// Starts a proxy to `127.0.0.1:upstream` on a free port, on its own thread.
    pub fn start(upstream: u16) -> Self {
        let rules: Arc<Mutex<Vec<Rule>>> = Arc::default();
        let fired: Arc<Mutex<usize>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let requests: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let chaos: Arc<Mutex<Option<Chaos>>> = Arc::default();
        let body_bytes: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (r, f, n, c, b) = (
            Arc::clone(&rules),
            Arc::clone(&fired),
            Arc::clone(&requests),
            Arc::clone(&chaos),
            Arc::clone(&body_bytes),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (r, f, c, b) = (
                        Arc::clone(&r),
                        Arc::clone(&f),
                        Arc::clone(&c),
                        Arc::clone(&b),
                    );
                    tokio::spawn(async move {
                        let _ = handle(client, upstream, r, f, c, b).await;
                    });
                }
            });
        });
        Self {
            port: rx.recv().unwrap(),
            rules,
            fired,
            requests,
            chaos,
            body_bytes,
        }
    }

    /// Body bytes the source served so far.
    pub fn served(&self) -> u64 {
        self.body_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to the next `times` ranged GETs whose request line contains
    /// `path_contains` (`None`: forever); a pattern naming `comp=list` matches listings.
    pub fn add(&self, path_contains: &str, fault: Fault, times: Option<usize>) {
        self.add_after(path_contains, 0, fault, times);
    }

    /// As [`FaultProxy::add`], after letting the first `skip` matching requests through.
    pub fn add_after(&self, path_contains: &str, skip: usize, fault: Fault, times: Option<usize>) {
        self.rules.lock().unwrap().push(Rule {
            path_contains: path_contains.to_string(),
            fault: Some(fault),
            hook: None,
            skip,
            remaining: times,
        });
    }

    /// Runs `hook` before forwarding the first ranged GET whose path contains `path_contains`.
    pub fn hook(&self, path_contains: &str, hook: Hook) {
        self.rules.lock().unwrap().push(Rule {
            path_contains: path_contains.to_string(),
            fault: None,
            hook: Some(hook),
            skip: 0,
            remaining: Some(1),
        });
    }

    /// Adds rules from elsewhere (a hook, when the download begins), as [`FaultProxy::add`].
    pub fn rule_adder(&self) -> impl Fn(&str, Fault, Option<usize>) + Send + Sync + 'static {
        let rules = Arc::clone(&self.rules);
        move |path_contains, fault, times| {
            rules.lock().unwrap().push(Rule {
                path_contains: path_contains.to_string(),
                fault: Some(fault),
                hook: None,
                skip: 0,
                remaining: times,
            });
        }
    }

    pub fn fired(&self) -> usize {
        *self.fired.lock().unwrap()
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
        if head.ends_with(b"\r\n\r\n") {
            return Ok(Some(head));
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `Content-Range: bytes A-B/N` moved one byte (down, or up from 0), same length.
fn shifted(line: &str) -> String {
    let value = line.split_once(':').map_or("", |(_, v)| v.trim());
    let parse = || -> Option<(u64, u64, u64)> {
        let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?, total.parse().ok()?))
    };
    match parse() {
        Some((0, b, n)) => format!("Content-Range: bytes 1-{}/{n}", b + 1),
        Some((a, b, n)) => format!("Content-Range: bytes {}-{}/{n}", a - 1, b - 1),
        None => line.to_string(),
    }
}

async fn handle(
    mut client: TcpStream,
    upstream: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    fired: Arc<Mutex<usize>>,
    chaos: Arc<Mutex<Option<Chaos>>>,
    body_bytes: Arc<std::sync::atomic::AtomicU64>,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut client).await? else {
        return Ok(());
    };
    let head_text = String::from_utf8_lossy(&head).into_owned();
    let len: usize = header(&head_text, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    client.read_exact(&mut body).await?;
    let request_line = head_text.lines().next().unwrap_or_default().to_string();
    let is_ranged_get = request_line.starts_with("GET ")
        && (header(&head_text, "x-ms-range").is_some() || header(&head_text, "range").is_some());

    let (fault, hook) = {
        let mut rules = rules.lock().unwrap();
        let mut chosen = (None, None);
        if request_line.starts_with("GET ") {
            for rule in rules.iter_mut() {
                if rule.remaining == Some(0) || !request_line.contains(&rule.path_contains) {
                    continue;
                }
                // Rules match ranged GETs, or listings and the manifest when they name them.
                let whole_object = rule.path_contains.contains("comp=list")
                    || rule.path_contains.contains("modelcache.manifest.json");
                if !is_ranged_get && !whole_object {
                    continue;
                }
                if rule.skip > 0 {
                    rule.skip -= 1;
                    continue;
                }
                if let Some(n) = rule.remaining.as_mut() {
                    *n -= 1;
                }
                chosen = (rule.fault, rule.hook.take());
                break;
            }
        }
        let unclaimed_get =
            chosen.0.is_none() && chosen.1.is_none() && request_line.starts_with("GET ");
        if unclaimed_get {
            if let Some(chaos) = chaos.lock().unwrap().as_mut() {
                if chaos.rng.f64() < chaos.probability && !chaos.faults.is_empty() {
                    let mut fault = chaos.faults[chaos.rng.usize(..chaos.faults.len())];
                    // Bits flip, and bodies overrun, in blob bytes; a listing with a flipped
                    // bit models nothing a TLS connection would let through.
                    if matches!(fault, Fault::FlipBit | Fault::LongBody(_)) && !is_ranged_get {
                        fault = Fault::ServerError;
                    }
                    *chaos.counts.entry(fault.name()).or_default() += 1;
                    chosen.0 = Some(fault);
                }
            }
        }
        chosen
    };
    if let Some(hook) = hook {
        hook().await;
    }
    if fault.is_some() {
        *fired.lock().unwrap() += 1;
    }
    match fault {
        Some(Fault::Busy { retry_after_secs }) => {
            let resp = format!(
                "HTTP/1.1 503 Server Busy\r\nRetry-After: {retry_after_secs}\r\nx-ms-error-code: ServerBusy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            client.write_all(resp.as_bytes()).await?;
            return client.shutdown().await;
        }
        Some(Fault::ServerError) => {
            let resp = "HTTP/1.1 500 Operation could not be completed within the specified time.\r\nx-ms-error-code: OperationTimedOut\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            client.write_all(resp.as_bytes()).await?;
            return client.shutdown().await;
        }
        Some(Fault::TooMany { retry_after_secs }) => {
            let resp = format!(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry_after_secs}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            client.write_all(resp.as_bytes()).await?;
            return client.shutdown().await;
        }
        Some(Fault::ResetBeforeHeaders) => {
            client.set_zero_linger()?;
            drop(client);
            return Ok(());
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::SilentBeforeHeaders(d)) => {
            tokio::time::sleep(d).await;
            return Ok(());
        }
        _ => {}
    }

    // Forward on a fresh connection that closes after the response.
    let mut forwarded = String::new();
    for line in head_text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        forwarded.push_str(line);
        forwarded.push_str("\r\n");
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).await?;
    up.write_all(forwarded.as_bytes()).await?;
    up.write_all(&body).await?;
    let mut response = Vec::new();
    up.read_to_end(&mut response).await?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |i| i + 4);
    let (raw_head, resp_body) = response.split_at(split);
    body_bytes.fetch_add(resp_body.len() as u64, std::sync::atomic::Ordering::Relaxed);
    // Every answer closes its connection, so a fault cannot poison a reused one.
    let mut head_out = String::new();
    for line in String::from_utf8_lossy(raw_head)
        .split("\r\n")
        .filter(|l| !l.is_empty())
    {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        let line = match fault {
            Some(Fault::NotPartial) if lower.starts_with("http/1.1 206") => {
                "HTTP/1.1 200 OK".to_string()
            }
            Some(Fault::NotPartial) if lower.starts_with("content-range:") => continue,
            Some(Fault::WrongRange) if lower.starts_with("content-range:") => shifted(line),
            Some(Fault::StripMd5) if lower.starts_with("content-md5:") => continue,
            Some(Fault::LongBody(extra)) if lower.starts_with("content-length:") => {
                format!("Content-Length: {}", resp_body.len() + extra)
            }
            _ => line.to_string(),
        };
        head_out.push_str(&line);
        head_out.push_str("\r\n");
    }
    head_out.push_str("Connection: close\r\n\r\n");
    let resp_head = head_out.as_bytes();
    let half = resp_body.len() / 2;
    match fault {
        Some(Fault::ResetMidBody) => {
            client.write_all(resp_head).await?;
            client.write_all(&resp_body[..half]).await?;
            client.flush().await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.set_zero_linger()?;
            drop(client);
        }
        Some(Fault::Truncate) => {
            client.write_all(resp_head).await?;
            client.write_all(&resp_body[..half]).await?;
            client.shutdown().await?;
        }
        Some(Fault::FlipBit) if !resp_body.is_empty() => {
            let mut flipped = resp_body.to_vec();
            flipped[half] ^= 0x10;
            client.write_all(resp_head).await?;
            client.write_all(&flipped).await?;
            client.shutdown().await?;
        }
        Some(Fault::LongBody(extra)) => {
            client.write_all(resp_head).await?;
            client.write_all(resp_body).await?;
            // The extra bytes come apart, after the body's end has been read.
            client.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&vec![0x5a; extra]).await?;
            client.shutdown().await?;
        }
        Some(Fault::Stall(d)) => {
            client.write_all(resp_head).await?;
            client.write_all(&resp_body[..half]).await?;
            client.flush().await?;
            tokio::time::sleep(d).await;
        }
        _ => {
            client.write_all(resp_head).await?;
            client.write_all(resp_body).await?;
            client.shutdown().await?;
        }
    }
    Ok(())
}
