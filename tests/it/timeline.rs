//! A new node's time to serving, by step: the agent's timeline of each model (`/v1/models`,
//! `modelcache status`, the boot histogram), `wait`'s own steps and the line it ends with, and
//! the steps in `prefetch --json`. The node-boot VM test reports the same figures from a real
//! boot (`vm.rs`).

use std::path::Path;
use std::time::Duration;

use crate::agent::{Agent, config, http, model_entry};
use crate::support::*;

/// A timeline's steps, in the order they happen.
pub(crate) const STEPS: [&str; 7] = [
    "disks_settled",
    "listing",
    "first_byte",
    "last_byte",
    "verified",
    "published",
    "ready",
];

/// The steps of a timeline that are set, in order, with their seconds.
fn steps(timeline: &serde_json::Value, names: &[&str]) -> Vec<f64> {
    names
        .iter()
        .map(|n| {
            timeline[*n]
                .as_f64()
                .unwrap_or_else(|| panic!("{n} missing from {timeline}"))
        })
        .collect()
}

fn assert_in_order(seconds: &[f64], timeline: &serde_json::Value) {
    assert!(
        seconds.windows(2).all(|w| w[0] <= w[1]) && seconds[0] >= 0.0,
        "steps out of order: {timeline}"
    );
}

#[test]
fn a_fill_is_timed_step_by_step_and_wait_ends_with_one_line_from_the_pods_start() {
    let source = small_model(200_000, 271);
    upload_manifest(source.path());
    let (node, pod) = FakeNode::with_pod(7);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model = model_entry("m", &format!("file://{}", source.path().display()), true);
    let config = config(&cache, &model, &node.leases_config());
    let mut agent = Agent::start(dir.path(), &config, "http://127.0.0.1:9", &[]);
    agent.until_ready("m");

    let (status, body) = http(&agent.read, "GET", "/v1/models/m", &[], "");
    assert_eq!(status, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let timeline = &status["timeline"];
    assert!(
        humantime::parse_rfc3339(timeline["agent_started_at"].as_str().unwrap()).is_ok(),
        "{timeline}"
    );
    let order = STEPS;
    assert_in_order(&steps(timeline, &order), timeline);

    // One observation per step of this boot.
    let (_, metrics) = http(&agent.read, "GET", "/metrics", &[], "");
    for step in order {
        let sample = format!("modelcache_boot_timeline_seconds_count{{step=\"{step}\"}} 1");
        assert!(metrics.contains(&sample), "{sample} not in:\n{metrics}");
    }

    // The operator's view.
    let mut cmd = modelcache();
    cmd.args(["status", "--api", &format!("http://{}", agent.read)]);
    let out = run(&mut cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("m: seconds after the agent started at ")
                && l.contains(" · first byte ")
                && l.contains(" · published ")),
        "{shown}"
    );

    // The consumer's: the pod started before this wait; the line says how long ago, and where
    // the time went.
    let shared = tempfile::tempdir().unwrap();
    let link = shared.path().join("model");
    let out = wait_warm(&agent, &cache, &link, &pod);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    let printed = stdout(&out);
    let last = printed.lines().last().unwrap_or_default();
    report(&format!("wait's last line: {last}"));
    assert!(
        last.starts_with("m: serving ")
            && last.contains(" s after the pod started: ")
            && last.contains(" s before this wait (image pulls, earlier init containers), ")
            && last.contains(" s waiting for the agent, link ")
            && last.contains(", warm ")
            && last.contains("; the agent (seconds after its start at ")
            && last.contains(" · published "),
        "{printed}"
    );

    // After a restart the model is ready at once: no fill, the step it was found ready.
    agent.terminate();
    let agent = Agent::start(dir.path(), &config, "http://127.0.0.1:9", &[]);
    agent.until_ready("m");
    let (_, body) = http(&agent.read, "GET", "/v1/models/m", &[], "");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let timeline = &status["timeline"];
    assert!(
        timeline["listing"].is_null() && timeline["first_byte"].is_null(),
        "{timeline}"
    );
    assert_in_order(&steps(timeline, &["disks_settled", "ready"]), timeline);
    // A restart is not a boot's fill: only the disks' step is observed.
    let (_, metrics) = http(&agent.read, "GET", "/metrics", &[], "");
    assert!(
        metrics.contains("modelcache_boot_timeline_seconds_count{step=\"disks_settled\"} 1")
            && !metrics.contains("modelcache_boot_timeline_seconds_count{step=\"ready\"}")
            && !metrics.contains("modelcache_boot_timeline_seconds_count{step=\"published\"}"),
        "{metrics}"
    );
}

fn wait_warm(agent: &Agent, cache: &Path, link: &Path, pod: &str) -> std::process::Output {
    let mut cmd = modelcache();
    cmd.args([
        "wait",
        "--model",
        "m",
        "--interval",
        "200ms",
        "--timeout",
        "60s",
    ])
    .args(["--api", &format!("http://{}", agent.read)])
    .arg("--cache-root")
    .arg(cache)
    .arg("--link")
    .arg(link)
    .args(["--lease", pod, "--warm"]);
    run(&mut cmd, Duration::from_secs(120))
}

#[test]
fn prefetch_json_gives_each_steps_seconds() {
    let source = small_model(100_000, 272);
    let cache = tempfile::tempdir().unwrap();
    let out = run(
        &mut prefetch_cmd(
            None,
            &format!("file://{}", source.path().display()),
            cache.path(),
            &[],
        ),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = summary(&out);
    let steps_seen = &summary["steps"];
    assert_in_order(
        &steps(
            steps_seen,
            &[
                "listing",
                "first_byte",
                "last_byte",
                "verified",
                "published",
            ],
        ),
        steps_seen,
    );
}
