"""Pays ComputePool with the official x402 Python SDK, unchanged, and reports what happened as JSON.

    python pay.py httpx|requests|openai

Environment: COMPUTEPOOL_URL (the API's base URL), X402_PAYER_KEY (0x… private key of a funded payer),
X402_NETWORK (e.g. eip155:16602), X402_ASSET (the token address), X402_MAX_AMOUNT (atomic units the client
may pay per request), X402_MODEL (the served model). Spend controls are the SDK's own: by default it pays
only its built-in USDC list, so a user of another token allows it explicitly, as done here.

Prints one JSON object: the HTTP status, the decoded PAYMENT-RESPONSE, and the text the model streamed.
"""

import asyncio
import base64
import json
import os
import sys

from eth_account import Account
from x402 import x402Client, x402ClientSync
from x402.mechanisms.evm.exact.register import register_exact_evm_client

BASE = os.environ["COMPUTEPOOL_URL"].rstrip("/")
KEY = os.environ["X402_PAYER_KEY"]
NETWORK = os.environ["X402_NETWORK"]
ASSET = os.environ["X402_ASSET"]
MAX_AMOUNT = os.environ["X402_MAX_AMOUNT"]
MODEL = os.environ.get("X402_MODEL", "smollm2-135m-instruct")
PROMPT = os.environ.get("X402_PROMPT", "Say hello.")
MAX_TOKENS = int(os.environ.get("X402_MAX_TOKENS", "8"))


def controls():
    return {"allowed_assets": [{"network": NETWORK, "asset": ASSET, "max_amount_per_payment": MAX_AMOUNT}]}


def session(headers):
    """The ComputePool session the payment credited (its token is shown once, to its payer)."""
    return {"id": headers.get("x-computepool-session"), "token": headers.get("x-computepool-session-token")}


def payment_response(headers):
    raw = headers.get("payment-response") or headers.get("x-payment-response")
    if raw is None:
        return None
    return json.loads(base64.b64decode(raw))


def body():
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }


def with_requests():
    import requests
    from x402.http.clients.requests import wrapRequestsWithPayment

    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key(KEY))
    client.set_spend_controls(controls())
    http = wrapRequestsWithPayment(requests.Session(), client)
    r = http.post(f"{BASE}/v1/chat/completions", json=body(), timeout=120)
    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    return {"status": r.status_code, "payment_response": payment_response(r.headers), "session": session(r.headers),
            "text": text}


async def with_httpx():
    from x402.http.clients.httpx import x402HttpxClient

    client = x402Client()
    register_exact_evm_client(client, Account.from_key(KEY))
    client.set_spend_controls(controls())
    async with x402HttpxClient(client, timeout=120) as http:
        r = await http.post(f"{BASE}/v1/chat/completions", json=body())
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
        return {"status": r.status_code, "payment_response": payment_response(r.headers), "session": session(r.headers),
            "text": text}


async def with_openai():
    from openai import AsyncOpenAI
    from x402.http.clients.httpx import x402HttpxClient

    client = x402Client()
    register_exact_evm_client(client, Account.from_key(KEY))
    client.set_spend_controls(controls())
    async with x402HttpxClient(client, timeout=120) as http:
        # max_retries=0: a retried 5xx must not pay twice.
        api = AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused", http_client=http, max_retries=0)
        raw = await api.chat.completions.with_raw_response.create(**body(), stream=True)
        pieces = []
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return {"status": raw.http_response.status_code, "payment_response": payment_response(raw.headers),
                "session": session(raw.headers), "text": "".join(pieces)}


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "requests":
        result = with_requests()
    elif mode == "httpx":
        result = asyncio.run(with_httpx())
    elif mode == "openai":
        result = asyncio.run(with_openai())
    else:
        sys.exit("usage: pay.py httpx|requests|openai")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
