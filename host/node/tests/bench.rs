//! `computepool bench` from the command line: llama-bench's tests by name, `--depth` included.

mod common;

use std::process::Output;

use common::engine as tiny;
use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    std::process::Command::new(common::bin()).arg("bench").args(args).output().expect("run computepool bench")
}

fn rows(out: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON row")).collect()
}

#[test]
fn depth_names_the_tests_and_runs_them_that_far_into_a_conversation() {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let dir = ckpt.dir().to_str().expect("a UTF-8 path");
    // 200 cached positions: past the cache's first growths and over several 64-position key blocks.
    let out = bench(&["--model", dir, "--pp", "8", "--tg", "4", "--depth", "200", "--repeats", "1", "--threads", "1", "--json"]);
    let rows = rows(&out);
    let tests: Vec<&str> = rows.iter().map(|r| r["test"].as_str().expect("a test name")).collect();
    assert_eq!(tests, ["pp8 @ d200", "tg4 @ d200"]);
    for r in &rows {
        assert!(r["tokens_per_s_median"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
    let plain = bench(&["--model", dir, "--pp", "8", "--tg", "4", "--repeats", "1", "--threads", "1", "--json"]);
    let plain: Vec<String> = self::rows(&plain).iter().map(|r| r["test"].as_str().expect("a test name").to_owned()).collect();
    assert_eq!(plain, ["pp8", "tg4"]);
}

#[test]
fn depth_past_the_context_window_is_refused_with_the_window_named() {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let dir = ckpt.dir().to_str().expect("a UTF-8 path");
    let depth = (tiny::MAX_POSITIONS - 2).to_string();
    let out = bench(&["--model", dir, "--pp", "8", "--tg", "0", "--depth", &depth, "--repeats", "1", "--json"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("context of {} positions", tiny::MAX_POSITIONS)), "{stderr}");
    // Through a pipeline the bench measures what a client sees; depth is the one-process bench's.
    let out = bench(&["--model", dir, "--shards", "2", "--depth", "16"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--depth"));
}
