//! The container image, built here from `deploy/Dockerfile` with no registry: a Debian base made
//! with mmdebstrap, the `prebuilt` target packaging this build's binary (`scripts/build-image`
//! does both), then the image's own binary run: `--help`, `agent --check` on the ConfigMap's
//! config.toml, and every tool disk setup calls found inside.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_image_builds_from_the_dockerfile_and_its_binary_and_tools_run() {
    if !(is_root() && have("buildah") && have("mmdebstrap")) {
        skip_or_fail(
            "building the image needs root, buildah and mmdebstrap (the test command installs them)",
        );
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = bin();
    let relative = binary
        .strip_prefix(repo)
        .expect("the binary is built in the repository");
    let out = run(
        Command::new(repo.join("scripts/build-image"))
            .arg("localhost/modelcache:test")
            .env("BINARY", relative)
            .current_dir(repo),
        Duration::from_secs(900),
    );
    let text = format!("{}\n{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}");
    for needle in [
        "Fills a local cache",
        "configuration OK: cache /mnt/modelcache",
        "/usr/sbin/mkfs.xfs",
        "/usr/sbin/mkfs.ext4",
        "/usr/sbin/mdadm",
        "image localhost/modelcache:test",
    ] {
        assert!(text.contains(needle), "missing {needle}: {text}");
    }
    report(&format!(
        "image: {}",
        text.lines().find(|l| l.starts_with("image ")).unwrap_or("")
    ));
}
