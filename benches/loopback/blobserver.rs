//! A fast loopback stand-in for Blob Storage, so that clients (not the server) are what the
//! benchmark measures: one thread per connection, bodies sent with `sendfile` from a RAM-backed
//! directory (or, over TLS, read with `pread` and encrypted by rustls), HTTP/1.1 keep-alive.
//!
//! It answers what the clients under test ask of Blob Storage: List Blobs
//! (`?restype=container&comp=list&prefix=…`, one page), Get Blob and Get Blob Properties with
//! `Range` or `x-ms-range`, `If-Match` against the blob's ETag, and 404 with Azure's error code.
//! Authorization headers are accepted unchecked. Paths are `/{account}/{container}/{blob}`, the
//! emulator's path style, or `/{container}/{blob}` when the request's `Host` is a name with a
//! dot (`{account}.blob.localhost:PORT`, Blob's own virtual-host style); `{root}/{container}/{blob}`
//! is the file.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// A link every connection shares, at `rate` bytes per second: a node's NIC, or its share of a
/// storage account's egress, so that a client is bound by the network and not by this host's
/// memory. Each 256 KiB step books the link's next free slot and is sent when it comes.
struct Link {
    rate: u64,
    next_free: Mutex<Instant>,
}

static LINK: OnceLock<Link> = OnceLock::new();

/// Caps what the server sends, over all connections together, at `rate` bytes per second.
pub fn set_link_rate(rate: u64) {
    let _ = LINK.set(Link {
        rate,
        next_free: Mutex::new(Instant::now()),
    });
}

impl Link {
    /// Waits for the link's next free slot for `bytes` and books it.
    fn take(&self, bytes: usize) {
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        if let Some(wait) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// Serves `root` on a free loopback port, printing `port N` on stdout once listening; never
/// returns. With `tls`, every connection is HTTPS.
pub fn serve(
    root: PathBuf,
    rate_per_connection: Option<u64>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> ! {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the loopback Blob server");
    let port = listener.local_addr().expect("local address").port();
    println!("port {port}");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let root = root.clone();
        let tls = tls.clone();
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let _ = match tls {
                Some(config) => match rustls::ServerConnection::new(config) {
                    Ok(session) => handle(
                        rustls::StreamOwned::new(session, conn),
                        &root,
                        rate_per_connection,
                    ),
                    Err(_) => Ok(()),
                },
                None => handle(conn, &root, rate_per_connection),
            };
        });
    }
    unreachable!("TcpListener::incoming never ends")
}

/// The server's TLS settings from a PEM certificate chain and key: TLS 1.3 and 1.2 with
/// aws-lc-rs (the provider modelcache's client uses too), the server's own suite order so that
/// every client gets the same one (TLS 1.3 AES-256-GCM), no session tickets.
pub fn tls_config(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("read the server certificate")
        .collect::<Result<_, _>>()
        .expect("parse the server certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("read the server key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("certificate and key match");
    config.ignore_client_order = true;
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A client connection: plain TCP, or TLS over it.
trait Conn: Read + Write {
    /// Sends `len` bytes of `file` from `*offset`, advancing it; returns the bytes sent.
    fn send_file(
        &mut self,
        file: &std::fs::File,
        offset: &mut i64,
        len: usize,
    ) -> std::io::Result<usize>;
}

impl Conn for TcpStream {
    fn send_file(
        &mut self,
        file: &std::fs::File,
        offset: &mut i64,
        len: usize,
    ) -> std::io::Result<usize> {
        loop {
            match nix::sys::sendfile::sendfile64(&*self, file, Some(offset), len) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Bytes read from the file and handed to rustls at a time.
const TLS_READ: usize = 256 << 10;

impl Conn for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn send_file(
        &mut self,
        file: &std::fs::File,
        offset: &mut i64,
        len: usize,
    ) -> std::io::Result<usize> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; TLS_READ]);
        }
        BUF.with_borrow_mut(|buf| {
            let want = len.min(buf.len());
            let at = u64::try_from(*offset).unwrap_or(0);
            let n = file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.write_all(&buf[..n])?;
            *offset += i64::try_from(n).unwrap_or(0);
            Ok(n)
        })
    }
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    // Request bodies are not used by any call served here; skip one if sent.
    if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::io::copy(&mut reader.by_ref().take(n), &mut std::io::sink())?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    Ok(Some(Request {
        method,
        path: decode(path),
        query,
        headers,
    }))
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn etag(meta: &std::fs::Metadata) -> String {
    let nanos = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    format!("0x{nanos:X}{:08X}", meta.ino())
}

fn http_date(meta: &std::fs::Metadata) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(meta.mtime()).unwrap_or(0));
    httpdate::fmt_http_date(t)
}

fn handle(conn: impl Conn, root: &Path, rate: Option<u64>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    while let Some(req) = read_request(&mut reader)? {
        respond(&req, reader.get_mut(), root, rate)?;
        reader.get_mut().flush()?;
    }
    Ok(())
}

fn simple(out: &mut impl Conn, status: &str, code: &str, extra: &str) -> std::io::Result<()> {
    let body =
        format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code></Error>");
    out.write_all(format!(
        "HTTP/1.1 {status}\r\nx-ms-error-code: {code}\r\nContent-Type: application/xml\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    ).as_bytes())
}

fn respond(
    req: &Request,
    out: &mut impl Conn,
    root: &Path,
    rate: Option<u64>,
) -> std::io::Result<()> {
    // `{account}.blob.localhost:PORT` names the account in the host; `127.0.0.1:PORT` and
    // `localhost:PORT` in the path.
    let host = req
        .headers
        .get("host")
        .map(String::as_str)
        .unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let virtual_host = host.contains('.') && host.parse::<std::net::IpAddr>().is_err();
    let mut segs = req
        .path
        .trim_start_matches('/')
        .splitn(if virtual_host { 2 } else { 3 }, '/');
    if !virtual_host {
        let _account = segs.next().unwrap_or_default();
    }
    let container = segs.next().unwrap_or_default();
    let blob = segs.next().unwrap_or_default();
    if container.is_empty() || container.contains("..") || blob.split('/').any(|s| s == "..") {
        return simple(out, "400 Bad Request", "InvalidUri", "");
    }
    if req.query.get("comp").map(String::as_str) == Some("list") {
        return list(req, out, &root.join(container), container);
    }
    if blob.is_empty() {
        // Container properties (some clients check that the container exists).
        return out.write_all(format!(
            "HTTP/1.1 200 OK\r\nETag: \"0x1\"\r\nLast-Modified: {}\r\nx-ms-version: 2021-08-06\r\nContent-Length: 0\r\n\r\n",
            httpdate::fmt_http_date(UNIX_EPOCH)
        ).as_bytes());
    }
    let path = root.join(container).join(blob);
    let Ok(file) = std::fs::File::open(&path) else {
        return simple(
            out,
            "404 The specified blob does not exist.",
            "BlobNotFound",
            "",
        );
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return simple(
            out,
            "404 The specified blob does not exist.",
            "BlobNotFound",
            "",
        );
    }
    let tag = etag(&meta);
    if let Some(want) = req.headers.get("if-match") {
        if want != "*" && want.trim_matches('"') != tag {
            return simple(out, "412 Precondition Failed", "ConditionNotMet", "");
        }
    }
    let size = meta.len();
    let range = req
        .headers
        .get("x-ms-range")
        .or_else(|| req.headers.get("range"))
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let start: u64 = a.parse().ok()?;
            let end = if b.is_empty() {
                size.checked_sub(1)?
            } else {
                b.parse::<u64>().ok()?.min(size.checked_sub(1)?)
            };
            (start <= end).then_some((start, end + 1))
        });
    let (status, start, end, content_range) = match range {
        Some((s, e)) => (
            "206 Partial Content",
            s,
            e,
            format!("Content-Range: bytes {s}-{}/{size}\r\n", e - 1),
        ),
        None => ("200 OK", 0, size, String::new()),
    };
    out.write_all(format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{content_range}Content-Type: application/octet-stream\r\nETag: \"{tag}\"\r\nLast-Modified: {}\r\nAccept-Ranges: bytes\r\nx-ms-blob-type: BlockBlob\r\nx-ms-version: 2021-08-06\r\nx-ms-creation-time: {}\r\nx-ms-lease-status: unlocked\r\nx-ms-lease-state: available\r\nx-ms-server-encrypted: true\r\nx-ms-request-id: 0\r\nDate: {}\r\n\r\n",
        end - start,
        http_date(&meta),
        http_date(&meta),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    ).as_bytes())?;
    if req.method == "HEAD" {
        return Ok(());
    }
    let mut offset = i64::try_from(start).unwrap_or(0);
    let stop = i64::try_from(end).unwrap_or(0);
    let began = std::time::Instant::now();
    let first = offset;
    // A per-connection cap stands in for Blob Storage, where one connection carries far less
    // than the node's link: send in 256 KiB steps, each once the cap would have carried it (so
    // a short answer is paced too, not sent a step ahead).
    let link = LINK.get();
    let step = if rate.is_some() || link.is_some() {
        256 << 10
    } else {
        1 << 30
    };
    while offset < stop {
        let want = usize::try_from(stop - offset)
            .unwrap_or(usize::MAX)
            .min(step);
        if let Some(rate) = rate {
            let due =
                Duration::from_secs_f64(((offset - first) as f64 + want as f64) / rate as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if let Some(link) = link {
            link.take(want);
        }
        out.send_file(&file, &mut offset, want)?;
    }
    Ok(())
}

fn list(req: &Request, out: &mut impl Conn, dir: &Path, container: &str) -> std::io::Result<()> {
    let prefix = req.query.get("prefix").cloned().unwrap_or_default();
    let mut names = Vec::new();
    walk(dir, dir, &mut names);
    names.sort();
    let mut body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults ServiceEndpoint=\"http://127.0.0.1/\" ContainerName=\"{container}\"><Prefix>{prefix}</Prefix><Blobs>"
    );
    for name in names.iter().filter(|n| n.starts_with(&prefix)) {
        let meta = std::fs::metadata(dir.join(name))?;
        body.push_str(&format!(
            "<Blob><Name>{name}</Name><Properties><Creation-Time>{d}</Creation-Time><Last-Modified>{d}</Last-Modified><Etag>\"{tag}\"</Etag><Content-Length>{len}</Content-Length><Content-Type>application/octet-stream</Content-Type><BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier><AccessTierInferred>true</AccessTierInferred><LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState><ServerEncrypted>true</ServerEncrypted></Properties></Blob>",
            d = http_date(&meta),
            tag = etag(&meta),
            len = meta.len(),
        ));
    }
    body.push_str("</Blobs><NextMarker/></EnumerationResults>");
    out.write_all(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nx-ms-version: 2021-08-06\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ).as_bytes())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}
