//! The host side of `computepool:host/http`: requests to the hosts the operator granted one plugin, with
//! the host's limits. The plugin names a URL; the host checks the scheme (https, or plain http only to a
//! loopback host, so no credentials or payments cross a network in clear), the host and port against the
//! plugin's grant, the method, the headers and the body size, then sends it from its own I/O runtime
//! ([`crate::blocking`]) and reads at most the response limit. Redirects are never followed: the plugin
//! gets the 3xx, and following it is a new request, checked again.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::blocking;

/// One grant: a host name or IP address and optionally a port (without one, the scheme's default port).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct HostGrant {
    /// Lowercase host name, dotted IPv4, or IPv6 without brackets.
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for HostGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match self.port {
            Some(port) => write!(f, "{host}:{port}"),
            None => f.write_str(&host),
        }
    }
}

impl std::str::FromStr for HostGrant {
    type Err = String;

    /// `example.com`, `example.com:8443`, `127.0.0.1:4021`, `[::1]:4021`. No scheme, path or user.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a host grant (host or host:port, e.g. `facilitator.example.com` or `127.0.0.1:4021`)");
        if s.is_empty() || s.contains(['/', '@', '?', '#']) || s.contains("://") {
            return Err(bad());
        }
        // Parsed as an https authority, so names, IPv4 and bracketed IPv6 follow the URL rules.
        let url = Url::parse(&format!("https://{s}")).map_err(|_| bad())?;
        let host = url_host(&url).ok_or_else(bad)?;
        let explicit_port = s.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
        let port = if explicit_port { Some(s.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).ok_or_else(bad)?) } else { None };
        Ok(HostGrant { host, port })
    }
}

impl TryFrom<String> for HostGrant {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

fn url_host(url: &Url) -> Option<String> {
    Some(match url.host()? {
        url::Host::Domain(d) => d.to_ascii_lowercase(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    })
}

/// Whether `host` (as [`url_host`] gives it) is this machine: `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The operator's limits on plugin HTTP (`[http]` in the host config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpLimits {
    /// Deadline of one request, connection to last body byte. Default 10 000 ms.
    pub timeout_ms: u64,
    /// Largest request body. Default 1 MiB.
    pub max_request_bytes: u64,
    /// Largest response body read; a longer one is an error. Default 4 MiB.
    pub max_response_bytes: u64,
    /// Most request headers. Default 64.
    pub max_headers: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { timeout_ms: 10_000, max_request_bytes: 1 << 20, max_response_bytes: 4 << 20, max_headers: 64 }
    }
}

/// Methods a plugin may use.
pub const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"];

/// Headers the host sets itself; a plugin may not.
const RESERVED_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Mirrors WIT's `http-error` one-to-one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("host {0} is not granted to this plugin")]
    HostNotGranted(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the response body passed the limit of {0} bytes")]
    TooLarge(u64),
    #[error("no response within the deadline")]
    Timeout,
    #[error("transport: {0}")]
    Transport(String),
}

/// The HTTP client all plugins share (one connection pool), and the limits.
pub struct HttpService {
    client: reqwest::Client,
    limits: HttpLimits,
}

impl fmt::Debug for HttpService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpService").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl HttpService {
    pub fn new(limits: HttpLimits) -> Result<Self, String> {
        // reqwest is built without a TLS provider of its own (the workspace's rustls uses ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(limits.timeout_ms))
            .build()
            .map_err(|e| format!("could not build the HTTP client: {e}"))?;
        Ok(Self { client, limits })
    }

    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    /// Checks `request` against `grants` and the limits; returns the parsed URL.
    pub fn check(&self, grants: &[HostGrant], request: &HttpRequest) -> Result<(reqwest::Method, Url, HeaderMap), HttpError> {
        let invalid = |m: String| HttpError::InvalidRequest(m);
        let method = request.method.to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err(invalid(format!("method `{}` (allowed: {})", request.method, METHODS.join(", "))));
        }
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| invalid(e.to_string()))?;
        let url = Url::parse(&request.url).map_err(|e| invalid(format!("URL `{}`: {e}", request.url)))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("URLs with credentials are refused".into()));
        }
        let host = url_host(&url).ok_or_else(|| invalid(format!("URL `{}` has no host", request.url)))?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&host) => {}
            "http" => return Err(invalid(format!("plain http to {host} (only https leaves this machine)"))),
            other => return Err(invalid(format!("scheme `{other}` (https, or http to a loopback host)"))),
        }
        let port = url.port_or_known_default().ok_or_else(|| invalid("no port".into()))?;
        let default_port = if url.scheme() == "https" { 443 } else { 80 };
        let granted = grants.iter().any(|g| g.host == host && g.port.unwrap_or(default_port) == port);
        if !granted {
            return Err(HttpError::HostNotGranted(HostGrant { host, port: Some(port) }.to_string()));
        }
        if request.body.len() as u64 > self.limits.max_request_bytes {
            return Err(invalid(format!(
                "a body of {} bytes is over the limit of {}",
                request.body.len(),
                self.limits.max_request_bytes
            )));
        }
        if request.headers.len() > self.limits.max_headers {
            return Err(invalid(format!("{} headers, over the limit of {}", request.headers.len(), self.limits.max_headers)));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(format!("header name `{name}`")))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(invalid(format!("header `{name}` is set by the host")));
            }
            let value = HeaderValue::from_str(value).map_err(|_| invalid(format!("the value of header `{name}`")))?;
            headers.append(name, value);
        }
        Ok((method, url, headers))
    }

    /// Sends `request` if `grants` allow it, blocking this thread (see [`crate::blocking`]).
    pub fn send(&self, grants: &[HostGrant], request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (method, url, headers) = self.check(grants, &request)?;
        let call = self.client.request(method, url).headers(headers).body(request.body);
        let limit = self.limits.max_response_bytes;
        let deadline = Duration::from_millis(self.limits.timeout_ms);
        let outcome = blocking::block_on(
            async move {
                let mut response = call.send().await.map_err(transport)?;
                let status = response.status().as_u16();
                let headers = response
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                    .collect();
                if response.content_length().is_some_and(|n| n > limit) {
                    return Err(HttpError::TooLarge(limit));
                }
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(transport)? {
                    if (body.len() + chunk.len()) as u64 > limit {
                        return Err(HttpError::TooLarge(limit));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(HttpResponse { status, headers, body })
            },
            deadline,
        );
        outcome.unwrap_or(Err(HttpError::Timeout))
    }
}

fn transport(e: reqwest::Error) -> HttpError {
    if e.is_timeout() {
        return HttpError::Timeout;
    }
    // The whole chain: reqwest's top-level message alone ("error sending request") says little.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    HttpError::Transport(message)
}

/// What one plugin instance may reach: the shared client and this plugin's grant.
#[derive(Debug, Clone)]
pub struct HttpAccess {
    pub service: Arc<HttpService>,
    pub grants: Arc<Vec<HostGrant>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(list: &[&str]) -> Vec<HostGrant> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn get(url: &str) -> HttpRequest {
        HttpRequest { method: "GET".into(), url: url.into(), headers: vec![], body: vec![] }
    }

    #[test]
    fn grants_parse_and_print() {
        let g: HostGrant = "Facilitator.Example.com".parse().unwrap();
        assert_eq!(g, HostGrant { host: "facilitator.example.com".into(), port: None });
        let g: HostGrant = "127.0.0.1:4021".parse().unwrap();
        assert_eq!(g.port, Some(4021));
        assert_eq!(g.to_string(), "127.0.0.1:4021");
        let g: HostGrant = "[::1]:80".parse().unwrap();
        assert_eq!((g.host.as_str(), g.port), ("::1", Some(80)));
        assert_eq!(g.to_string(), "[::1]:80");
        for bad in ["", "https://x.com", "x.com/path", "user@x.com", "x.com:99999", "x.com:"] {
            assert!(bad.parse::<HostGrant>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn only_granted_hosts_and_ports_pass() {
        let service = HttpService::new(HttpLimits::default()).unwrap();
        let g = grants(&["facilitator.example.com", "127.0.0.1:4021"]);
        assert!(service.check(&g, &get("https://facilitator.example.com/verify")).is_ok());
        assert!(service.check(&g, &get("http://127.0.0.1:4021/verify")).is_ok());
        assert_eq!(
            service.check(&g, &get("https://facilitator.example.com:8443/")).unwrap_err(),
            HttpError::HostNotGranted("facilitator.example.com:8443".into())
        );
        assert_eq!(service.check(&g, &get("http://127.0.0.1:4022/")).unwrap_err(), HttpError::HostNotGranted("127.0.0.1:4022".into()));
        assert_eq!(service.check(&g, &get("https://evil.example.com/")).unwrap_err(), HttpError::HostNotGranted("evil.example.com:443".into()));
    }

    #[test]
    fn plain_http_only_to_loopback_and_limits_hold() {
        let service = HttpService::new(HttpLimits { max_request_bytes: 4, ..HttpLimits::default() }).unwrap();
        let g = grants(&["facilitator.example.com:80", "localhost:80"]);
        let err = service.check(&g, &get("http://facilitator.example.com/")).unwrap_err();
        assert!(matches!(&err, HttpError::InvalidRequest(m) if m.contains("plain http")), "{err}");
        assert!(service.check(&g, &get("http://localhost/")).is_ok());
        let bad_method = HttpRequest { method: "CONNECT".into(), ..get("http://localhost/") };
        assert!(matches!(service.check(&g, &bad_method), Err(HttpError::InvalidRequest(m)) if m.contains("CONNECT")));
        let big = HttpRequest { method: "POST".into(), body: vec![0; 5], ..get("http://localhost/") };
        assert!(matches!(service.check(&g, &big), Err(HttpError::InvalidRequest(m)) if m.contains("over the limit")));
        let host_header = HttpRequest { headers: vec![("Host".into(), "evil".into())], ..get("http://localhost/") };
        assert!(matches!(service.check(&g, &host_header), Err(HttpError::InvalidRequest(m)) if m.contains("set by the host")));
        assert!(matches!(service.check(&g, &get("ftp://localhost/")), Err(HttpError::InvalidRequest(_))));
        assert!(matches!(service.check(&g, &get("http://u:p@localhost/")), Err(HttpError::InvalidRequest(_))));
    }
}
