//! The official `openai` Python package, unmodified, against `computepool up`: chat and completions,
//! streamed and not, give the direct run's text; an unknown model is the client's NotFoundError; Ctrl-C
//! stops everything. `make test` installs the package (scripts/openai-client.sh) and passes its python
//! as COMPUTEPOOL_OPENAI_PYTHON.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, smollm2_dir, wait_for};
use serde_json::Value;

const CLIENT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base_url, model, question, prompt = sys.argv[1:5]
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
out = {"version": openai.__version__}
messages = [{"role": "user", "content": question}]

r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
out["chat"] = r.choices[0].message.content
out["chat_tokens"] = r.usage.completion_tokens
out["chat_finish"] = r.choices[0].finish_reason

text, usage = "", None
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage.completion_tokens
out["chat_stream"], out["chat_stream_tokens"] = text, usage

r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
out["completion"] = r.choices[0].text
out["completion_stream"] = "".join(
    c.choices[0].text for c in client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    if c.choices
)
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code
print(json.dumps(out))
"#;

fn direct_text(model: &std::path::Path, args: &[&str]) -> (String, usize) {
    let out = Command::new(bin())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--threads", "1", "--temperature", "0", "--json"])
        .args(args)
        .output()
        .expect("run generate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr.lines().rev().find(|l| l.starts_with('{')).expect("JSON line");
    let v: Value = serde_json::from_str(line).expect("JSON");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    (text.strip_suffix('\n').expect("final newline").to_string(), v["tokens"].as_array().expect("tokens").len())
}

#[test]
fn the_official_openai_client_works_against_computepool_up() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let Some(python) = std::env::var_os("COMPUTEPOOL_OPENAI_PYTHON") else {
        assert!(
            std::env::var("COMPUTEPOOL_REQUIRE_OPENAI").as_deref() != Ok("1"),
            "COMPUTEPOOL_REQUIRE_OPENAI=1 but COMPUTEPOOL_OPENAI_PYTHON is not set (run scripts/openai-client.sh)"
        );
        eprintln!("skipped: COMPUTEPOOL_OPENAI_PYTHON is not set (`make test` sets it)");
        return;
    };
    let question = "What is the capital of France? Answer in one sentence.";
    let prompt = "Once upon a time";
    let (want_chat, chat_tokens) = direct_text(&model, &["--chat", "--prompt", question, "--max-tokens", "24"]);
    let (want_completion, _) = direct_text(&model, &["--prompt", prompt, "--max-tokens", "16"]);

    let state = tempfile::tempdir().expect("temp dir");
    let models_dir = model.parent().expect("models dir");
    let name = model.file_name().and_then(|n| n.to_str()).expect("model name");
    let mut up = Command::new(bin())
        .args(["up", "--payments", "off", "--listen", "127.0.0.1:0", "--threads", "1", "--model", name, "--models-dir"])
        .arg(models_dir)
        .arg("--state-dir")
        .arg(state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start computepool up");
    let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
    let base_url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.trim().strip_prefix("OpenAI-compatible API:").map(|u| u.trim().to_string()));
    let Some(base_url) = base_url else {
        let _ = up.kill();
        let out = up.wait_with_output().expect("output");
        panic!("`computepool up` printed no base URL:\n{}", String::from_utf8_lossy(&out.stderr));
    };
    // Keep draining the banner so `up` never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    let out = Command::new(&python)
        .args(["-c", CLIENT, &base_url, name, question, prompt])
        .output()
        .expect("run the openai client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the openai client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_str(stdout.trim()).expect("JSON from the client");
    eprintln!("openai {} against {base_url}", got["version"]);
    assert_eq!(got["chat"], want_chat.as_str());
    assert_eq!(got["chat_stream"], want_chat.as_str());
    assert_eq!(got["chat_tokens"], chat_tokens as u64);
    assert_eq!(got["chat_stream_tokens"], chat_tokens as u64);
    assert_eq!(got["completion"], want_completion.as_str());
    assert_eq!(got["completion_stream"], want_completion.as_str());
    assert_eq!(got["unknown_model"], 404);

    // Ctrl-C stops the orchestrator and the workers, and `up` exits cleanly.
    let pid = up.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().expect("kill").success());
    assert!(wait_for(Duration::from_secs(10), || up.try_wait().expect("poll").is_some()), "`up` did not stop on Ctrl-C");
    let status = up.wait().expect("status");
    assert!(status.success(), "`up` exited with {status}");
    let addr = base_url.trim_start_matches("http://").trim_end_matches("/v1").to_string();
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the API still answers after Ctrl-C");
}
