//! A small HTTP/1.1 client over a raw `TcpStream` (reqwest is not usable in this workspace; see
//! docs/NOTES.md): one request per connection, `Connection: close`, chunked bodies decoded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// A response: status, lower-cased headers, and the (de-chunked) body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        sse_data(&self.body)
    }
}

pub fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).map(str::to_string).collect()
}

fn head(method: &str, host: &str, path: &str, body_len: usize, extra: &[(&str, &str)]) -> String {
    let extra: String = extra.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n{extra}Connection: close\r\n\r\n"
    )
}

/// Sends one request and reads the whole response. The body is written from a second thread, so a
/// server that answers (413) before reading a large body is still heard.
pub fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> Response {
    request_with(addr, method, path, body, &[])
}

/// A POST with the operator token as its bearer token.
pub fn post_as(addr: &str, path: &str, body: &Value, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    request_with(addr, "POST", path, body.to_string().as_bytes(), &[("Authorization", &auth)])
}

/// [`request`] with extra headers.
pub fn request_with(addr: &str, method: &str, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Response {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut message = head(method, addr, path, body.len(), headers).into_bytes();
    message.extend_from_slice(body);
    let sender = std::thread::spawn(move || {
        // The server may close early (a refused body): not an error here.
        let _ = writer.write_all(&message);
    });
    let mut raw = Vec::new();
    let mut reader = stream;
    let mut buf = [0u8; 65536];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A reset after the answer arrived (the server closed with our body unread).
            Err(_) if !raw.is_empty() => break,
            Err(e) => panic!("reading the response from {addr}{path}: {e}"),
        }
    }
    let _ = sender.join();
    parse(&raw)
}

pub fn get(addr: &str, path: &str) -> Response {
    request(addr, "GET", path, b"")
}

pub fn post(addr: &str, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, body.to_string().as_bytes())
}

fn parse(raw: &[u8]) -> Response {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no complete response head in {:?}", String::from_utf8_lossy(raw));
    });
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = &raw[split + 4..];
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Response { status, headers, body: String::from_utf8(body).expect("UTF-8 body") }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&body[..end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
        if size == 0 || body.len() < end + 2 + size {
            break;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[(end + 4 + size).min(body.len())..];
    }
    out
}

/// A streaming request whose SSE body is read line by line (and abandoned by dropping it).
pub struct EventStream {
    reader: BufReader<TcpStream>,
    pub status: u16,
}

impl EventStream {
    pub fn open(addr: &str, path: &str, body: &Value) -> Self {
        Self::open_with(addr, path, body, &[])
    }

    /// Opens it with more request headers.
    pub fn open_with(addr: &str, path: &str, body: &Value, headers: &[(&str, &str)]) -> Self {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let body = body.to_string();
        stream.write_all(head("POST", addr, path, body.len(), headers).as_bytes()).expect("write head");
        stream.write_all(body.as_bytes()).expect("write body");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Self { reader, status }
    }

    /// The next `data:` payload (chunk framing lines are skipped: SSE lines never look like sizes
    /// followed by nothing else, and payloads start with `data:`).
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                return Some(data.to_string());
            }
        }
    }
}
