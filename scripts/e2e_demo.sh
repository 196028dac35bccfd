#!/usr/bin/env bash
# `make demo`: the whole path end to end on this machine. Brings up a pool with `computepool up` (the
# orchestrator and SHARDS worker processes, hidden states over encrypted QUIC between them), streams
# one chat completion through the sharded pool printing each token as it arrives, shows what the
# orchestrator saw (/topology, /metrics), then stops everything and checks that it stopped cleanly.
#
# Environment: BIN (the computepool binary), MODEL, MODELS_DIR, SHARDS (default 2), PROMPT.
set -euo pipefail

BIN=${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/computepool/target}/release/computepool}
MODEL=${MODEL:-smollm2-135m-instruct}
MODELS_DIR=${MODELS_DIR:-models}
SHARDS=${SHARDS:-2}
PROMPT=${PROMPT:-Explain in three sentences why the sky is blue.}

for tool in curl jq python3; do
    command -v "$tool" >/dev/null || { echo "e2e_demo: needs $tool" >&2; exit 1; }
done
[[ -x $BIN ]] || { echo "e2e_demo: no binary at $BIN (make build)" >&2; exit 1; }

work=$(mktemp -d -t computepool-demo-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
up_pid=

stop() {
    if [[ -n $up_pid ]] && kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
}
trap 'stop; rm -rf "$work"' EXIT

echo "== starting $SHARDS workers and the orchestrator on $url"
"$BIN" up --payments off --model "$MODEL" --models-dir "$MODELS_DIR" --workers "$SHARDS" --listen "127.0.0.1:$port" \
    --state-dir "$work/state" >"$work/up.out" 2>"$work/up.log" &
up_pid=$!
for _ in $(seq 1 600); do
    grep -q "ComputePool is up" "$work/up.out" 2>/dev/null && break
    if ! kill -0 "$up_pid" 2>/dev/null; then
        echo "e2e_demo: computepool up exited before the pool was ready:" >&2
        tail -n 30 "$work/up.log" >&2
        exit 1
    fi
    sleep 0.5
done
grep -q "ComputePool is up" "$work/up.out" || { echo "e2e_demo: the pool was not ready within 300 s" >&2; exit 1; }

echo "== pool topology (layer ranges -> workers)"
curl -fsS "$url/topology" | jq -r '.pools[] | "pool \(.pool) (\(.model)), ready: \(.ready)",
    (.shards[] | "  layers \(.layers): " + ([.workers[] | "\(.peer[0:10])… \(.status)"] | join(", ")))'

echo "== streaming one chat completion: $PROMPT"
body=$(jq -cn --arg model "$MODEL" --arg prompt "$PROMPT" \
    '{model: $model, messages: [{role: "user", content: $prompt}], max_tokens: 96, temperature: 0, stream: true,
      stream_options: {include_usage: true}}')
started=$EPOCHREALTIME
curl -fsSN "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$body" \
    | sed -un 's/^data: //p' | grep --line-buffered -v '^\[DONE\]$' \
    | jq --unbuffered -rj 'if (.choices | length) > 0 then (.choices[0].delta.content // "")
                           else "\n\n(\(.usage.prompt_tokens) prompt tokens, \(.usage.completion_tokens) generated)" end'
echo
awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "== done in %.2f s\n", b - a }'

# One heartbeat (2 s by default) later, the workers' reports show the request's caches freed.
sleep 2.5
echo "== what /metrics says"
curl -fsS "$url/metrics" | grep -E '^computepool_(requests_total\{outcome="(stop|length)"\}|tokens_generated_total|time_to_first_token_seconds_(sum|count)|worker_kv_caches)'

echo "== stopping"
kill -TERM "$up_pid"
rc=0
wait "$up_pid" || rc=$?
up_pid=
if [[ $rc -ne 0 ]]; then
    echo "e2e_demo: computepool up exited with status $rc" >&2
    tail -n 20 "$work/up.log" >&2
    exit 1
fi
if curl -s -o /dev/null "$url/healthz"; then
    echo "e2e_demo: the API still answers after the stop" >&2
    exit 1
fi
echo "stopped cleanly (exit status 0, port closed)"
