// Pays ComputePool with the official npm x402 client (@x402/fetch + @x402/evm), unchanged, and prints what
// happened as JSON. Same environment as pay.py: COMPUTEPOOL_URL, X402_PAYER_KEY, X402_NETWORK, X402_ASSET,
// X402_MAX_AMOUNT, X402_MODEL.
import { wrapFetchWithPayment, x402Client } from "@x402/fetch";
import { registerExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const base = env("COMPUTEPOOL_URL").replace(/\/$/, "");
const network = env("X402_NETWORK");
const asset = env("X402_ASSET");

const client = new x402Client();
registerExactEvmScheme(client, { signer: privateKeyToAccount(env("X402_PAYER_KEY")) });
client.setSpendControls({ allowedAssets: [{ network, asset, maxAmountPerPayment: env("X402_MAX_AMOUNT") }] });
const pay = wrapFetchWithPayment(fetch, client);

const response = await pay(`${base}/v1/chat/completions`, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({
    model: env("X402_MODEL", "smollm2-135m-instruct"),
    messages: [{ role: "user", content: env("X402_PROMPT", "Say hello.") }],
    max_tokens: Number(env("X402_MAX_TOKENS", "8")),
    temperature: 0,
  }),
});
const header = response.headers.get("payment-response") ?? response.headers.get("x-payment-response");
const text = await response.text();
let content = text;
if (response.status === 200) content = JSON.parse(text).choices[0].message.content;
console.log(JSON.stringify({
  status: response.status,
  payment_response: header ? JSON.parse(Buffer.from(header, "base64").toString()) : null,
  session: { id: response.headers.get("x-computepool-session"), token: response.headers.get("x-computepool-session-token") },
  text: content,
}));
