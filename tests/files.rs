//! A file server for tests that fetch model files (no internet): on loopback, in this process.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A file server for the tests. The first folder of a path says how it answers; the last part
/// names the file:
/// - `/files/F`: the whole file, or from a `Range: bytes=N-` on;
/// - `/cut/F`: the first request without a range gets half the file and a closed connection;
/// - `/slow/F`: the file in 10 pieces, 80 ms apart;
/// - `/trickle/F`: the file 16 bytes at a time, 100 ms apart (a download that takes minutes);
/// - `/hf/ORG/REPO/resolve/REV/F`: as `/files/F` (Hugging Face's URL layout).
pub struct FileServer {
    base: String,
    /// Every request: its path, its Range header and its Authorization header (empty without).
    requests: Arc<Mutex<Vec<Seen>>>,
}

impl FileServer {
    pub fn start(files: HashMap<String, Vec<u8>>) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the file server");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (files, log) = (Arc::new(files), Arc::clone(&requests));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, log) = (Arc::clone(&files), Arc::clone(&log));
                std::thread::spawn(move || serve(stream, &files, &log));
            }
        });
        FileServer { base, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The requests whose path starts with `prefix`, with their ranges.
    pub fn requests_to(&self, prefix: &str) -> Vec<(String, String)> {
        let requests = self.requests.lock().expect("requests");
        requests.iter().filter(|r| r.path.starts_with(prefix)).map(|r| (r.path.clone(), r.range.clone())).collect()
    }

    /// The Authorization headers of the requests whose path starts with `prefix`.
    pub fn authorizations_to(&self, prefix: &str) -> Vec<String> {
        let requests = self.requests.lock().expect("requests");
        requests.iter().filter(|r| r.path.starts_with(prefix)).map(|r| r.authorization.clone()).collect()
    }
}

/// One request as the file server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: String,
    authorization: String,
}

fn serve(mut stream: TcpStream, files: &HashMap<String, Vec<u8>>, log: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let mut range = String::new();
    let mut authorization = String::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().to_owned();
            } else if name.eq_ignore_ascii_case("authorization") {
                authorization = value.trim().to_owned();
            }
        }
    }
    log.lock().expect("log").push(Seen { path: path.clone(), range: range.clone(), authorization });
    let name = path.rsplit('/').next().unwrap_or_default();
    let Some(body) = files.get(name) else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return;
    };
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
        .min(body.len());
    let head = match start {
        0 => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()),
        _ => format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{}\r\nconnection: close\r\n\r\n",
            body.len() - start,
            body.len() - 1,
            body.len()
        ),
    };
    let _ = stream.write_all(head.as_bytes());
    let rest = &body[start..];
    if path.starts_with("/cut/") && range.is_empty() {
        let _ = stream.write_all(&rest[..rest.len() / 2]);
        let _ = stream.flush();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    if path.starts_with("/trickle/") {
        for piece in rest.chunks(16) {
            std::thread::sleep(Duration::from_millis(100));
            if stream.write_all(piece).and_then(|()| stream.flush()).is_err() {
                return;
            }
        }
        return;
    }
    if path.starts_with("/slow/") {
        for piece in rest.chunks(rest.len().div_ceil(10).max(1)) {
            std::thread::sleep(Duration::from_millis(80));
            if stream.write_all(piece).and_then(|()| stream.flush()).is_err() {
                return;
            }
        }
        return;
    }
    let _ = stream.write_all(rest);
}

pub fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

