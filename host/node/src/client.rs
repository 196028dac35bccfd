//! A client of a pipeline's entry shard: what `computepool generate --shards` (and later the
//! orchestrator) uses to submit a request and read its events.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use computepool_axl::transport::{GENERATE_ALPN, ShardPeer, Transport, TransportConfig, describe_close};
use iroh::SecretKey;
use iroh::endpoint::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::worker::api::{ErrorKind, Event, FinishReason, GenerateRequest};

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
        if entry.addrs.iter().any(|a| !a.ip().is_loopback()) {
            config.bind.clear();
        }
        let transport = Transport::bind(config).await?;
        let conn = transport.connect(entry.peer, &entry.addrs, GENERATE_ALPN).await?;
        Ok(Self { transport, conn })
    }

    /// Runs one request, calling `on_event` for each event as it arrives.
    pub async fn generate(
        &self,
        request: &GenerateRequest,
        mut on_event: impl FnMut(&Event),
    ) -> anyhow::Result<Result<Completion, RequestFailed>> {
        let started = Instant::now();
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| anyhow::anyhow!(describe_close(&e)))?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        if let Err(e) = send.write_all(&line).await {
            bail!("sending the request to the entry: {}", self.why_closed(e.to_string()));
        }
        let _ = send.finish();
        let mut lines = BufReader::new(recv).lines();
        let (mut id, mut tokens, mut text, mut prompt_tokens) = (String::new(), Vec::new(), String::new(), 0);
        let mut first_token: Option<Instant> = None;
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let why = self.why_closed("it closed the stream before the request finished".into());
                    bail!("the entry ended the request without an answer: {why}");
                }
                Err(e) => {
                    let message = format!("the entry's stream broke: {}", self.why_closed(e.to_string()));
                    return Ok(Err(RequestFailed { code: ErrorKind::Unavailable, message }));
                }
            };
            let event: Event = serde_json::from_str(&line).with_context(|| format!("unreadable event from the entry: {line:?}"))?;
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
