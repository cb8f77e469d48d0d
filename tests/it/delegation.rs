//! With Dragonfly on, the agent hands dfdaemon a URL per file, signed with a user delegation
//! key when its credential is an Azure AD token. Asking for that key needs a role the reader
//! role does not give, and without it every file silently falls back to a direct fetch. The
//! agent asks for one at start and says in one line (log, `/readyz`, `agent --check`) whether
//! dfdaemon can be used.
//!
//! Against Azurite serving HTTPS with `--oauth basic`, the only way it hands out user
//! delegation keys: a token it accepts gets one; one it refuses does not (Azurite has no roles,
//! so "refused" is an expired token here, where Azure would answer
//! AuthorizationPermissionMismatch for a missing Storage Blob Delegator role; both are a 403 to
//! the same request).

use std::path::Path;
use std::time::Duration;

use crate::agent::{Agent, config, http, model_entry};
use crate::support::*;

/// The agent's configuration with Dragonfly on (its dfdaemon is never reached: the check only
/// signs) and one unpinned model on the OAuth Azurite.
fn dragonfly_config(dir: &Path) -> String {
    config(
        &dir.join("cache"),
        &model_entry("m", "az://models/m", false),
        &format!(
            "[disk]\nenabled = false\n[fetch.dragonfly]\nsocket = \"{}\"\n",
            dir.join("no-dfdaemon.sock").display()
        ),
    )
}

/// A workload identity's view of the account: a bearer token, the account's endpoint (as
/// `https://ACCOUNT.blob.core.windows.net` would be), and the test CA. Not the emulator's
/// settings: those sign with the account key.
fn identity(az: &OAuthAzurite, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_USE_EMULATOR", "false".into()),
        ("AZURE_CREDENTIAL_TYPE", "bearer_token".into()),
        ("AZURE_STORAGE_TOKEN", token.into()),
        ("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1".into()),
        (
            "AZURE_STORAGE_ENDPOINT",
            format!("{}/devstoreaccount1", az.endpoint()),
        ),
        ("SSL_CERT_FILE", az.ca.display().to_string()),
    ]
}

fn check(dir: &Path, az: &OAuthAzurite, token: &str) -> String {
    let file = dir.join("agent.toml");
    std::fs::write(&file, dragonfly_config(dir)).unwrap();
    let mut cmd = modelcache();
    cmd.envs(identity(az, token))
        .args(["agent", "--check", "--config"])
        .arg(&file);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// The agent with Dragonfly on, holding `token`.
fn agent_with(dir: &Path, az: &OAuthAzurite, token: &str) -> Agent {
    let identity = identity(az, token);
    let envs: Vec<(&str, &str)> = identity.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Agent::start(dir, &dragonfly_config(dir), &az.endpoint(), &envs)
}

#[test]
fn a_token_that_cannot_get_a_user_delegation_key_is_reported_in_one_line_everywhere() {
    let Some(az) = azurite_oauth() else { return };
    let dir = tempfile::tempdir().unwrap();
    let expired = azure_ad_token(-7200, -3600);

    let checked = check(dir.path(), az, &expired);
    let line = checked
        .lines()
        .find(|l| l.starts_with("dragonfly (with this process's credentials): "))
        .unwrap_or_else(|| panic!("no check line: {checked}"));
    report(&format!(
        "dragonfly check with a token refused a user delegation key: {line}"
    ));
    assert!(
        line.contains("unusable: dfdaemon cannot be used, every file is fetched directly")
            && line.contains("Storage Blob Delegator")
            && line.contains("user delegation key"),
        "{line}"
    );

    let agent = agent_with(dir.path(), az, &expired);
    agent.until_logged("dragonfly: unusable: dfdaemon cannot be used");
    let logged = agent.log();
    let logged_line = logged
        .lines()
        .find(|l| l.contains("dragonfly: unusable"))
        .unwrap();
    assert!(
        logged_line.contains("Storage Blob Delegator"),
        "{logged_line}"
    );
    // The agent still serves: readiness is about the cache, and says why dfdaemon is idle.
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200, "{body}");
    let readiness: serde_json::Value = serde_json::from_str(&body).unwrap();
    let detail = readiness["dragonfly"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("unusable: ") && detail.contains("Storage Blob Delegator"),
        "{body}"
    );
}

#[test]
fn a_token_that_can_get_a_user_delegation_key_is_reported_usable() {
    let Some(az) = azurite_oauth() else { return };
    let dir = tempfile::tempdir().unwrap();
    let valid = azure_ad_token(-60, 3600);

    let checked = check(dir.path(), az, &valid);
    assert!(
        checked.contains(
            "dragonfly (with this process's credentials): usable: dfdaemon is handed a read-only URL per file (m)"
        ),
        "{checked}"
    );

    let agent = agent_with(dir.path(), az, &valid);
    agent.until_logged("dragonfly: usable: ");
    let (_, body) = http(&agent.read, "GET", "/readyz", &[], "");
    let readiness: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        readiness["dragonfly"]
            .as_str()
            .is_some_and(|d| d.starts_with("usable: ")),
        "{body}"
    );
}
