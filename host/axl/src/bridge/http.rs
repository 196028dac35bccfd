//! A minimal HTTP/1.1 client for the daemon's loopback API: one request at a time per connection,
//! keep-alive with a small pool, `Content-Length` and `chunked` bodies, every length capped.
//!
//! Why not reqwest: in this crate reqwest is built with the `rustls-no-provider` feature (iroh's
//! `tls-ring` turns it on through feature unification), and then `reqwest::Client::builder().build()`
//! panics unless a process-wide rustls crypto provider was installed, even for plain-HTTP use.
//! Going back to reqwest needs `rustls` (already in the tree) as a direct dependency to hand it a
//! preconfigured TLS config; this module is the only thing that would change.
//!
//! Hostile or broken answers give [`HttpError::Malformed`], never a panic or an unbounded buffer.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Uri;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Most bytes of a response's status line and headers together.
const MAX_HEAD_BYTES: u64 = 64 * 1024;
/// Most header lines in one response.
const MAX_HEADERS: usize = 128;
/// Most bytes of one chunk-size line (hex size plus extensions).
const MAX_CHUNK_LINE_BYTES: u64 = 1024;
/// Most `1xx` interim responses skipped before the real one.
const MAX_INTERIM_RESPONSES: usize = 8;
/// Idle connections kept for reuse.
const MAX_IDLE_CONNECTIONS: usize = 4;

type Connection = BufReader<TcpStream>;

/// Why an HTTP exchange failed.
#[derive(Debug)]
pub(crate) enum HttpError {
    /// Connecting, writing or reading failed.
    Io(io::Error),
    /// The whole exchange took longer than the client's timeout.
    Timeout(Duration),
    /// The answer is not HTTP/1.x as this client reads it.
    Malformed(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Io(error) => write!(f, "{error}"),
            HttpError::Timeout(limit) => write!(f, "no complete answer within {limit:?}"),
            HttpError::Malformed(reason) => write!(f, "malformed HTTP answer: {reason}"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(error: io::Error) -> Self {
        HttpError::Io(error)
    }
}

fn malformed(reason: impl Into<String>) -> HttpError {
    HttpError::Malformed(reason.into())
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpRequest<'a> {
    pub(crate) method: &'static str,
    pub(crate) path: &'static str,
    /// Extra header lines; names and values must be visible ASCII (the caller's are constants and
    /// hex).
    pub(crate) headers: &'a [(&'static str, &'a str)],
    /// The body, as parts sent back to back (so a frame's header and payload need not be joined),
    /// with `Content-Length` their total.
    pub(crate) body: &'a [&'a [u8]],
}

/// A response body read up to a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// All of it.
    Whole(Vec<u8>),
    /// Longer than the limit: at least this many bytes. The rest was not read (the connection is
    /// dropped).
    Over(u64),
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    /// Header names in lower case, values as sent (trimmed).
    headers: Vec<(String, Vec<u8>)>,
    pub(crate) body: Body,
    /// Whether the connection may carry another request.
    reusable: bool,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }
}

/// A keep-alive HTTP/1.1 client of one `http://host:port` origin.
#[derive(Debug, Clone)]
pub(crate) struct HttpClient {
    /// For the `Host` header: `host:port` as configured.
    authority: String,
    /// For connecting: the host without IPv6 brackets.
    host: String,
    port: u16,
    timeout: Duration,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl HttpClient {
    /// A client of `base_url`, which must be `http://host[:port][/]` and nothing more.
    pub(crate) fn new(base_url: &str, timeout: Duration) -> Result<Self, String> {
        let uri: Uri = base_url.parse().map_err(|e| format!("{e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(format!("scheme {other:?} is not http (the daemon's API is plain HTTP)")),
            None => return Err("no scheme: write it as http://host:port".to_string()),
        }
        let authority = uri.authority().ok_or("no host")?;
        if authority.as_str().contains('@') {
            return Err("user info is not supported".to_string());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() || base_url.contains('#') {
            return Err("give only scheme, host and port".to_string());
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err("no host".to_string());
        }
        Ok(HttpClient {
            authority: authority.as_str().to_string(),
            host,
            port: authority.port_u16().unwrap_or(80),
            timeout,
            idle: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Sends `request` and reads the answer, its body up to `max_body` bytes.
    pub(crate) async fn send(&self, request: &HttpRequest<'_>, max_body: usize) -> Result<HttpResponse, HttpError> {
        tokio::time::timeout(self.timeout, self.exchange(request, max_body))
            .await
            .map_err(|_| HttpError::Timeout(self.timeout))?
    }

    async fn exchange(&self, request: &HttpRequest<'_>, max_body: usize) -> Result<HttpResponse, HttpError> {
        if let Some(mut connection) = self.take_idle() {
            match round_trip(&mut connection, &self.authority, request, max_body).await {
                Ok(response) => {
                    self.put_idle(connection, &response);
                    return Ok(response);
                }
                // The server closed the idle connection before reading the request: it never saw
                // it, so sending it again on a fresh connection cannot duplicate it.
                Err(Failure { answered: false, .. }) => {}
                Err(failure) => return Err(failure.error),
            }
        }
        let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
        stream.set_nodelay(true)?;
        let mut connection = BufReader::new(stream);
        let response = round_trip(&mut connection, &self.authority, request, max_body).await.map_err(|f| f.error)?;
        self.put_idle(connection, &response);
        Ok(response)
    }

    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop()
    }

    fn put_idle(&self, connection: Connection, response: &HttpResponse) {
        if response.reusable && connection.buffer().is_empty() {
            let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if idle.len() < MAX_IDLE_CONNECTIONS {
                idle.push(connection);
            }
        }
    }
}

/// A failed round trip, and whether any byte of an answer had arrived.
struct Failure {
    error: HttpError,
    answered: bool,
}

async fn round_trip(
    connection: &mut Connection,
    authority: &str,
    request: &HttpRequest<'_>,
    max_body: usize,
) -> Result<HttpResponse, Failure> {
    let unanswered = |error: HttpError| Failure { error, answered: false };
    let mut head = format!("{} {} HTTP/1.1\r\nHost: {authority}\r\n", request.method, request.path);
    for (name, value) in request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let body_len: usize = request.body.iter().map(|part| part.len()).sum();
    if body_len > 0 || request.method == "POST" {
        head.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    head.push_str("\r\n");
    let stream = connection.get_mut();
    let written = async {
        stream.write_all(head.as_bytes()).await?;
        for part in request.body {
            stream.write_all(part).await?;
        }
        stream.flush().await
    }
    .await;
    if let Err(write_error) = written {
        // A server may answer before reading the whole body (e.g. 413) and close: read its answer
        // if it got through; otherwise the request was not answered.
        return match read_response(connection, max_body).await {
            Ok(response) => Ok(HttpResponse { reusable: false, ..response }),
            Err(_) => Err(unanswered(write_error.into())),
        };
    }
    // A closed idle connection shows up as an immediate EOF (or reset) on the first read.
    match connection.fill_buf().await {
        Ok([]) => return Err(unanswered(HttpError::Io(io::ErrorKind::UnexpectedEof.into()))),
        Ok(_) => {}
        Err(error) => return Err(unanswered(error.into())),
    }
    read_response(connection, max_body).await.map_err(|error| Failure { error, answered: true })
}

/// Reads one response (skipping `1xx` interim ones) from `reader`.
pub(crate) async fn read_response<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_body: usize,
) -> Result<HttpResponse, HttpError> {
    for _ in 0..=MAX_INTERIM_RESPONSES {
        let (status, http_1_0, headers) = read_head(reader).await?;
        if (100..200).contains(&status) {
            continue;
        }
        let mut response = HttpResponse { status, headers, body: Body::Whole(Vec::new()), reusable: !http_1_0 };
        if response.header("connection").is_some_and(|v| has_token(v, "close")) {
            response.reusable = false;
        }
        if status == 204 || status == 304 {
            return Ok(response);
        }
        response.body = if let Some(encoding) = response.header("transfer-encoding") {
            if !last_token_is(encoding, "chunked") {
                return Err(malformed("transfer-encoding other than chunked"));
            }
            read_chunked(reader, max_body).await?
        } else if let Some(length) = response.header("content-length") {
            let length = parse_content_length(length)?;
            if length > max_body as u64 {
                Body::Over(length)
            } else {
                let mut body = vec![0; length as usize];
                reader.read_exact(&mut body).await?;
                Body::Whole(body)
            }
        } else {
            // No framing: the body runs to the end of the connection.
            response.reusable = false;
            read_to_close(reader, max_body).await?
        };
        if matches!(response.body, Body::Over(_)) {
            response.reusable = false;
        }
        return Ok(response);
    }
    Err(malformed("too many interim (1xx) responses"))
}

/// Status code, whether the version is HTTP/1.0, and the headers.
async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<(u16, bool, Vec<(String, Vec<u8>)>), HttpError> {
    let mut budget = MAX_HEAD_BYTES;
    let status_line = read_line(reader, &mut budget).await?;
    let mut parts = status_line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let http_1_0 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Err(malformed(format!("status line starts with {:?}", echo(version)))),
    };
    let status = match code {
        [a, b, c] if code.iter().all(u8::is_ascii_digit) => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(malformed(format!("status code {:?}", echo(code)))),
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut budget).await?;
        if line.is_empty() {
            return Ok((status, http_1_0, headers));
        }
        if headers.len() == MAX_HEADERS {
            return Err(malformed(format!("more than {MAX_HEADERS} headers")));
        }
        let colon = line.iter().position(|&b| b == b':').ok_or_else(|| malformed("header line without a colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(format!("header name {:?}", echo(name))));
        }
        let value = value.trim_ascii();
        headers.push((String::from_utf8_lossy(name).to_ascii_lowercase(), value.to_vec()));
    }
}

/// One line without its line ending (CRLF or LF), charged to `budget`.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, budget: &mut u64) -> Result<Vec<u8>, HttpError> {
    let mut line = Vec::new();
    let read = (&mut *reader).take(*budget).read_until(b'\n', &mut line).await?;
    *budget -= read as u64;
    if line.last() != Some(&b'\n') {
        return Err(if *budget == 0 {
            malformed("head or line too long")
        } else {
            HttpError::Io(io::ErrorKind::UnexpectedEof.into())
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

async fn read_chunked<R: AsyncBufRead + Unpin>(reader: &mut R, max_body: usize) -> Result<Body, HttpError> {
    let mut body = Vec::new();
    loop {
        let mut budget = MAX_CHUNK_LINE_BYTES;
        let line = read_line(reader, &mut budget).await?;
        let digits = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
        let size = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 16)
            .and_then(|d| u64::from_str_radix(d, 16).ok())
            .ok_or_else(|| malformed(format!("chunk size {:?}", echo(digits))))?;
        if size == 0 {
            // Trailers, up to the empty line.
            let mut budget = MAX_HEAD_BYTES;
            while !read_line(reader, &mut budget).await?.is_empty() {}
            return Ok(Body::Whole(body));
        }
        let total = (body.len() as u64).saturating_add(size);
        if total > max_body as u64 {
            return Ok(Body::Over(total));
        }
        let start = body.len();
        body.resize(start + size as usize, 0);
        reader.read_exact(&mut body[start..]).await?;
        let mut budget = 2;
        if !read_line(reader, &mut budget).await?.is_empty() {
            return Err(malformed("chunk data longer than its size"));
        }
    }
}

async fn read_to_close<R: AsyncBufRead + Unpin>(reader: &mut R, max_body: usize) -> Result<Body, HttpError> {
    let mut body = Vec::new();
    let limit = (max_body as u64).saturating_add(1);
    (&mut *reader).take(limit).read_to_end(&mut body).await?;
    if body.len() > max_body {
        return Ok(Body::Over(body.len() as u64));
    }
    Ok(Body::Whole(body))
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    // Repeated identical values ("12, 12") are allowed by RFC 9110 §8.6; anything else is not.
    let mut values = value.split(|&b| b == b',').map(|v| v.trim_ascii());
    let first = values.next().unwrap_or_default();
    let parse = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let length = parse(first).ok_or_else(|| malformed(format!("content-length {:?}", echo(value))))?;
    if values.any(|v| parse(v) != Some(length)) {
        return Err(malformed(format!("content-length {:?}", echo(value))));
    }
    Ok(length)
}

fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn last_token_is(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').next_back().is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A few bytes from the wire, for an error message.
fn echo(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(32)]).into_owned();
    if bytes.len() > 32 { format!("{text}…") } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::net::TcpListener;

    async fn parse(bytes: &[u8], max_body: usize) -> Result<HttpResponse, HttpError> {
        let mut reader = bytes;
        read_response(&mut reader, max_body).await
    }

    #[tokio::test]
    async fn content_length_chunked_and_empty_bodies() {
        let r =
            parse(b"HTTP/1.1 200 OK\r\nX-From-Peer-Id: ab\r\nContent-Length: 5\r\n\r\nhello", 100).await.expect("ok");
        assert_eq!((r.status, r.body.clone(), r.reusable), (200, Body::Whole(b"hello".to_vec()), true));
        assert_eq!(r.header("x-from-peer-id"), Some(&b"ab"[..]));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n";
        assert_eq!(parse(chunked, 100).await.expect("ok").body, Body::Whole(b"abcde".to_vec()));
        let empty = parse(b"HTTP/1.1 204 No Content\r\nDate: now\r\n\r\n", 100).await.expect("ok");
        assert_eq!((empty.status, empty.body), (204, Body::Whole(Vec::new())));
        let interim = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 10).await;
        assert_eq!(interim.expect("ok").status, 200);
        let to_close = parse(b"HTTP/1.0 200 OK\r\n\r\nrest of it", 100).await.expect("ok");
        assert_eq!((to_close.body, to_close.reusable), (Body::Whole(b"rest of it".to_vec()), false));
        let close = parse(b"HTTP/1.1 400 Bad\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", 10).await;
        assert!(!close.expect("ok").reusable);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_not_read() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", 10).await.expect("ok");
        assert_eq!((r.body, r.reusable), (Body::Over(1_000_000), false));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\nffffffff\r\n";
        assert_eq!(parse(chunked, 10).await.expect("ok").body, Body::Over(8 + 0xffff_ffff));
        let to_close = parse(b"HTTP/1.1 200 OK\r\n\r\n0123456789abc", 10).await.expect("ok");
        assert_eq!(to_close.body, Body::Over(11));
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"HTTP/1.1 200 OK\r\n",
            b"SPDY/3 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 20x OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n : v\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
        ];
        for case in cases {
            assert!(parse(case, 100).await.is_err(), "{:?}", String::from_utf8_lossy(case));
        }
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 70 * 1024));
        assert!(matches!(parse(&long, 100).await, Err(HttpError::Malformed(_))));
    }

    #[test]
    fn base_urls() {
        let client = HttpClient::new("http://127.0.0.1:9002", Duration::from_secs(1)).expect("valid");
        assert_eq!(
            (client.host.as_str(), client.port, client.authority.as_str()),
            ("127.0.0.1", 9002, "127.0.0.1:9002")
        );
        let v6 = HttpClient::new("http://[::1]:7/", Duration::from_secs(1)).expect("valid");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 7));
        assert_eq!(HttpClient::new("http://localhost", Duration::from_secs(1)).expect("valid").port, 80);
        for bad in
            ["", "localhost:9002", "https://h:1", "http://h:1/x", "http://h:1/?q", "http://u@h:1", "http://h:1/#f"]
        {
            assert!(HttpClient::new(bad, Duration::from_secs(1)).is_err(), "{bad}");
        }
    }

    /// A server that answers each connection's first request with `answer`, then closes it.
    async fn one_shot_server(answer: &'static [u8]) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let task = tokio::spawn(async move {
            let mut served = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let mut stream = BufReader::new(stream);
                let mut budget = MAX_HEAD_BYTES;
                while let Ok(line) = read_line(&mut stream, &mut budget).await {
                    if line.is_empty() {
                        break;
                    }
                }
                let _ = stream.get_mut().write_all(answer).await;
                served += 1;
                if served == 2 {
                    return served;
                }
            }
            served
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        // The answer claims keep-alive, but the server closes: the pooled connection is stale and
        // the second request must go through a fresh one.
        let (url, server) = one_shot_server(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let client = HttpClient::new(&url, Duration::from_secs(5)).expect("valid");
        let get = HttpRequest { method: "GET", path: "/recv", headers: &[], body: &[] };
        assert_eq!(client.send(&get, 10).await.expect("first").status, 204);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(client.send(&get, 10).await.expect("second, on a new connection").status, 204);
        assert_eq!(server.await.expect("server ran"), 2);
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let _server = tokio::spawn(async move {
            let (_stream, _) = listener.accept().await.expect("accepts");
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let client = HttpClient::new(&url, Duration::from_millis(100)).expect("valid");
        let get = HttpRequest { method: "GET", path: "/recv", headers: &[], body: &[] };
        assert!(matches!(client.send(&get, 10).await, Err(HttpError::Timeout(_))));
    }

    proptest! {
        #[test]
        fn any_answer_parses_or_fails_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let _ = runtime.block_on(parse(&bytes, 64));
        }

        #[test]
        fn mutated_valid_answers_never_panic(cut in 0usize..90, flip in 0usize..90, byte in any::<u8>()) {
            let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec();
            let flip = flip % bytes.len();
            bytes[flip] = byte;
            bytes.truncate(cut.min(bytes.len()));
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let _ = runtime.block_on(parse(&bytes, 64));
        }
    }
}
