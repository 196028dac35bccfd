//! A client of a pipeline's entry shard: what the orchestrator and `computepool generate --shards`
//! use to submit a request and read its events.

use std::time::{Duration, Instant};

use anyhow::bail;
use computepool_axl::transport::{GENERATE_ALPN, Relays, ShardPeer, Transport, TransportConfig, describe_close};
use iroh::SecretKey;
use iroh::endpoint::{Connection, RecvStream, VarInt};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};

use crate::{ErrorKind, Event, FinishReason, GenerateRequest};

/// A finished request, as the client saw it.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: String,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// From sending the request to the first token.
    pub time_to_first_token: Duration,
    /// From the first token to the last.
    pub decode_time: Duration,
}

/// A request that failed, with the entry's (or the link's) reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RequestFailed {
    pub code: ErrorKind,
    pub message: String,
}

/// A connection to an entry shard.
pub struct EntryClient {
    transport: Transport,
    conn: Connection,
}

impl EntryClient {
    /// Connects to `entry` with `key` (which the topology must list as a client).
    pub async fn connect(key: SecretKey, entry: &ShardPeer) -> anyhow::Result<Self> {
        let mut config = TransportConfig::new(key);
        config.bind = vec!["127.0.0.1:0".parse().expect("valid address")];
        if entry.relay.is_some() || entry.addrs.iter().any(|a| !a.ip().is_loopback()) {
            config.bind.clear();
        }
        if let Some(relay) = &entry.relay {
            config.relays = Relays::Custom(vec![relay.clone()]);
        }
        let transport = Transport::bind(config).await?;
        let conn = transport.connect(entry.peer, &entry.addrs, entry.relay.as_ref(), GENERATE_ALPN).await?;
        Ok(Self { transport, conn })
    }

    /// Sends one request and returns its stream of events. Dropping the [`RequestStream`] before the
    /// request is over cancels it at the entry (docs/PROTOCOL.md §12). `Err` means the request could not
    /// be sent (the connection is gone: the caller should reconnect).
    pub async fn start(&self, request: &GenerateRequest) -> anyhow::Result<RequestStream> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| anyhow::anyhow!(describe_close(&e)))?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        if let Err(e) = send.write_all(&line).await {
            bail!("sending the request to the entry: {}", self.why_closed(e.to_string()));
        }
        let _ = send.finish();
        Ok(RequestStream { lines: BufReader::new(recv).lines(), conn: self.conn.clone(), over: false })
    }

    /// Whether the connection to the entry is closed (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Runs one request, calling `on_event` for each event as it arrives.
    pub async fn generate(
        &self,
        request: &GenerateRequest,
        mut on_event: impl FnMut(&Event),
    ) -> anyhow::Result<Result<Completion, RequestFailed>> {
        let started = Instant::now();
        let mut stream = self.start(request).await?;
        let (mut id, mut tokens, mut text, mut prompt_tokens) = (String::new(), Vec::new(), String::new(), 0);
        let mut first_token: Option<Instant> = None;
        while let Some(event) = stream.next_event().await {
            on_event(&event);
            match event {
                Event::Started { id: i, prompt_tokens: p } => {
                    id = i;
                    prompt_tokens = p;
                }
                Event::Token { token, text: t } => {
                    first_token.get_or_insert_with(Instant::now);
                    tokens.push(token);
                    text.push_str(&t);
                }
                Event::Done { finish_reason, .. } => {
                    let first = first_token.unwrap_or_else(Instant::now);
                    return Ok(Ok(Completion {
                        id,
                        tokens,
                        text,
                        finish_reason,
                        prompt_tokens,
                        time_to_first_token: first - started,
                        decode_time: first.elapsed(),
                    }));
                }
                Event::Error { code, message } => return Ok(Err(RequestFailed { code, message })),
            }
        }
        bail!("the entry's event stream ended without a final event")
    }

    /// The connection's close reason if it is closed (e.g. "unknown peer"), else `fallback`.
    fn why_closed(&self, fallback: String) -> String {
        match self.conn.close_reason() {
            Some(e) => describe_close(&e),
            None => fallback,
        }
    }

    /// Like [`Self::generate`], retrying while the entry refuses the request as `unavailable` (workers
    /// still connecting), for at most `wait`.
    pub async fn generate_when_ready(
        &self,
        request: &GenerateRequest,
        wait: Duration,
        mut on_event: impl FnMut(&Event),
    ) -> anyhow::Result<Result<Completion, RequestFailed>> {
        let deadline = Instant::now() + wait;
        loop {
            // Only a request the entry refused before starting it is retried: one that failed midway
            // has streamed output already.
            let mut started = false;
            let outcome = self
                .generate(request, |event| {
                    started |= matches!(event, Event::Started { .. });
                    on_event(event)
                })
                .await?;
            match outcome {
                Err(RequestFailed { code: ErrorKind::Unavailable, .. }) if !started && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return Ok(other),
            }
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.transport.close().await;
    }
}

/// The events of one request in flight, in order.
///
/// Dropping it before the final event cancels the request: the receive side is stopped
/// (`STOP_SENDING`), the entry notices at once and sends `end` down the pipeline, which frees the
/// request's KV cache on every shard.
pub struct RequestStream {
    lines: Lines<BufReader<RecvStream>>,
    conn: Connection,
    over: bool,
}

/// Application error code a client stops a request's stream with when it cancels the request.
pub const CANCEL_CODE: u32 = 0;

impl RequestStream {
    /// The next event; `None` after the final one (`done` or `error`). A broken stream or an unreadable
    /// line is reported as a final `error` event (code `unavailable` or `internal`).
    pub async fn next_event(&mut self) -> Option<Event> {
        if self.over {
            return None;
        }
        let event = match self.lines.next_line().await {
            Ok(Some(line)) => serde_json::from_str(&line).unwrap_or_else(|e| Event::Error {
                code: ErrorKind::Internal,
                message: format!("unreadable event from the entry ({e}): {line:?}"),
            }),
            Ok(None) => Event::Error {
                code: ErrorKind::Unavailable,
                message: format!(
                    "the entry ended the request without an answer: {}",
                    self.why_closed("it closed the stream before the request finished")
                ),
            },
            Err(e) => Event::Error {
                code: ErrorKind::Unavailable,
                message: format!("the entry's stream broke: {}", self.why_closed(&e.to_string())),
            },
        };
        self.over = matches!(event, Event::Done { .. } | Event::Error { .. });
        Some(event)
    }

    fn why_closed(&self, fallback: &str) -> String {
        match self.conn.close_reason() {
            Some(e) => describe_close(&e),
            None => fallback.to_string(),
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.over {
            // Explicit rather than left to the QUIC stream's own drop: this is the cancel signal.
            let _ = self.lines.get_mut().get_mut().stop(VarInt::from_u32(CANCEL_CODE));
        }
    }
}
