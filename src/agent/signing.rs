//! Whether dfdaemon can be used at all, asked once at start.
//!
//! With Dragonfly on, the agent hands dfdaemon one read-only URL per file (see
//! [`crate::source::Source::shareable_url`]). With an Azure AD identity (workload or managed
//! identity) that URL is signed with a user delegation key, and Get User Delegation Key needs
//! `generateUserDelegationKey` at the storage account's scope: the reader role on one container
//! does not give it. Without it every file silently falls back to a direct fetch, so the fleet
//! reads the source once per node, the opposite of why Dragonfly is on. This check signs one
//! URL per configured model at start, and every [`RECHECK_INTERVAL`] while it cannot, and says
//! in one line what it found.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Environment;
use crate::config::agent::AgentConfig;
use crate::fetch::error_chain;
use crate::source::{self, RemoteFile, SourceOptions, redact_url};

/// How often an agent that found dfdaemon unusable asks again.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(120);

/// How long the check waits for the storage service.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// What the check found: `usable: …` or `unusable: …`, on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DragonflyCheck {
    /// dfdaemon can be handed URLs for every model it could fetch.
    pub usable: bool,
    /// The line: how, or why not.
    pub line: String,
}

impl std::fmt::Display for DragonflyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

/// Signs one URL (for the model's manifest, valid a minute) per configured model; `None` when
/// Dragonfly is off.
pub async fn check(config: &AgentConfig, env: &Environment) -> Option<DragonflyCheck> {
    config.fetch.dragonfly.as_ref()?;
    let mut signed = Vec::new();
    // One URL per container and account: models beside each other share the answer, and a
    // fleet of agents asking again while unusable asks the identity service no more than that.
    let mut asked = std::collections::BTreeSet::new();
    for spec in &config.models {
        if !asked.insert((spec.account.clone(), container_of(&spec.source))) {
            signed.push(spec.name.to_string());
            continue;
        }
        let shown = redact_url(&spec.source);
        let opened = source::open(
            &spec.source,
            env,
            &SourceOptions {
                account: spec.account.clone(),
                confine: None,
            },
        );
        let source: Arc<dyn source::Source> = match opened {
            Ok(s) => s,
            Err(e) => {
                return Some(unusable(format!(
                    "{}: cannot open {shown}: {}",
                    spec.name,
                    error_chain(&e)
                )));
            }
        };
        let probe = RemoteFile {
            path: source::MANIFEST_NAME.to_string(),
            size: 0,
            etag: String::new(),
        };
        let answer = tokio::time::timeout(
            CHECK_TIMEOUT,
            source.shareable_url(&probe, Duration::from_secs(60)),
        )
        .await;
        match answer {
            Ok(Ok(Some(_))) => signed.push(spec.name.to_string()),
            // A local directory: dfdaemon cannot read it, and the fetch does not ask it to.
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                // The source's own context names the file, which was never read: the cause is
                // what matters.
                let cause = one_line(
                    &std::error::Error::source(&e).map_or_else(|| error_chain(&e), error_chain),
                );
                // A refusal (403) is the role; a timeout or a token that cannot be had is not.
                let hint = if cause.contains("403")
                    || cause.contains("AuthorizationPermissionMismatch")
                {
                    " (hint: with a workload or managed identity the agent's identity needs the Storage Blob Delegator role on the storage account itself, not only a reader role on the container)"
                } else {
                    ""
                };
                return Some(unusable(format!(
                    "cannot sign a URL for {} ({shown}): {cause}{hint}",
                    spec.name,
                )));
            }
            Err(_) => {
                return Some(unusable(format!(
                    "signing a URL for {} ({shown}) took longer than {}s",
                    spec.name,
                    CHECK_TIMEOUT.as_secs()
                )));
            }
        }
    }
    Some(if signed.is_empty() {
        DragonflyCheck {
            usable: false,
            line: "unusable: no configured model has a source dfdaemon can read on its own (Azure Blob Storage); files are fetched directly".to_string(),
        }
    } else {
        DragonflyCheck {
            usable: true,
            line: format!(
                "usable: dfdaemon is handed a read-only URL per file ({})",
                signed.join(", ")
            ),
        }
    })
}

/// The longest answer quoted, in characters: it is shown on the read listener.
const MAX_ANSWER: usize = 500;

/// The storage service's answer on one line: its XML error body's text without tags, control
/// characters, the request's id and time, or how long it took (so two answers alike read
/// alike), at most [`MAX_ANSWER`] characters.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if in_tag => {}
            c if c.is_control() => out.push(' '),
            _ => out.push(c),
        }
    }
    let mut words: Vec<&str> = Vec::new();
    for word in out.split_whitespace() {
        if word.starts_with("RequestId:") || word.starts_with("Time:") {
            continue;
        }
        // "… in 86.008675ms - …": the time the request took.
        if is_duration(word) && words.last() == Some(&"in") {
            words.pop();
            continue;
        }
        words.push(word);
    }
    let line = words.join(" ");
    match line.char_indices().nth(MAX_ANSWER) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// `86.008675ms`, `1.2s`, `950µs`.
fn is_duration(word: &str) -> bool {
    ["ms", "µs", "ns", "s"]
        .iter()
        .find_map(|unit| word.strip_suffix(unit))
        .is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok())
}

/// The account-and-container part of a source URL: `az://CONTAINER` or
/// `https://ACCOUNT.blob.core.windows.net/CONTAINER`.
fn container_of(source: &str) -> String {
    let without_query = source.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = without_query
        .split_once("://")
        .unwrap_or(("", without_query));
    let mut parts = rest.split('/');
    let host = parts.next().unwrap_or_default();
    match scheme {
        "az" => format!("az://{host}"),
        _ => format!("{scheme}://{host}/{}", parts.next().unwrap_or_default()),
    }
}

fn unusable(why: String) -> DragonflyCheck {
    DragonflyCheck {
        usable: false,
        line: format!(
            "unusable: dfdaemon cannot be used, every file is fetched directly from the source: {why}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xml_error_body_becomes_one_line() {
        let body = "403 Forbidden: <?xml version=\"1.0\"?>\n<Error>\n  <Code>AuthorizationPermissionMismatch</Code>\n  <Message>This request is not authorized.\nRequestId:1f2e\nTime:2026-12-07T08:00:00.0000000Z</Message>\n</Error>\u{1b}[31m";
        assert_eq!(
            one_line(body),
            "403 Forbidden: AuthorizationPermissionMismatch This request is not authorized. [31m"
        );
        assert_eq!(
            one_line(
                "Error performing POST https://a/?comp=userdelegationkey in 86.008675ms - Server returned 403"
            ),
            "Error performing POST https://a/?comp=userdelegationkey - Server returned 403"
        );
        assert_eq!(one_line("sign in 2 steps"), "sign in 2 steps");
        let long = "x".repeat(1000);
        assert_eq!(one_line(&long).chars().count(), MAX_ANSWER + 1);
    }

    #[test]
    fn models_in_one_container_share_a_check() {
        assert_eq!(container_of("az://models/gpt-oss-120b"), "az://models");
        assert_eq!(container_of("az://models/llama"), "az://models");
        assert_eq!(
            container_of("https://acct.blob.core.windows.net/models/m?sv=1&sig=x"),
            "https://acct.blob.core.windows.net/models"
        );
        assert_ne!(
            container_of("https://a.blob.core.windows.net/models/m"),
            container_of("https://b.blob.core.windows.net/models/m")
        );
    }
}
