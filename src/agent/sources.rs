//! Which sources an API request may name. The agent runs as root on the node's network: a
//! request that could name any URL would copy any host path (`file:///etc`, the node's
//! service-account tokens) into a directory every model reader mounts, or repoint a production
//! model. So a request may name a source only under a prefix the operator allowed in
//! `api.allowed_sources` (empty by default: requests can only fetch configured models), and never
//! change a configured model's source or account.

/// A refusal, with the setting that would allow the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceRefused {
    /// The model is configured with another source or account.
    #[error(
        "{model} is configured with its own source; a request cannot repoint it (change models[].source in the agent's configuration)"
    )]
    Repoint {
        /// The model.
        model: String,
    },
    /// The source is under no allowed prefix.
    #[error(
        "requests may not name the source {source_url}: it is under no prefix of api.allowed_sources ({allowed}); add its prefix there to allow it"
    )]
    NotAllowed {
        /// The source, redacted.
        source_url: String,
        /// The allowed prefixes, or `none`.
        allowed: String,
    },
    /// A request named a storage account: an `az://` prefix would then reach any account the
    /// node's identity can read.
    #[error(
        "requests may not name a storage account; allow https://ACCOUNT.blob.core.windows.net/CONTAINER/ prefixes in api.allowed_sources instead"
    )]
    Account,
    /// The source's path has `.` or `..` segments, which could leave an allowed prefix.
    #[error("the source {source_url} has a '.' or '..' path segment; name the directory plainly")]
    DotSegments {
        /// The source, redacted.
        source_url: String,
    },
}

/// Checks a source named by a request for an unconfigured model against the allowed prefixes.
/// A prefix allows itself and everything below it as a directory: `file:///mnt/models/` (or
/// `file:///mnt/models`) allows `file:///mnt/models/llama`, not `file:///mnt/models-private`.
pub fn check_allowed(source: &str, allowed: &[String]) -> Result<(), SourceRefused> {
    let redacted = crate::source::redact_url(source);
    let without_query = source.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_decode(without_query);
    let path_part = decoded
        .split_once("://")
        .map_or(decoded.as_str(), |(_, rest)| rest);
    if path_part
        .split(['/', '\\'])
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(SourceRefused::DotSegments {
            source_url: redacted,
        });
    }
    let under = |prefix: &String| {
        let dir = prefix.trim_end_matches('/');
        !dir.is_empty()
            && (without_query == dir
                || without_query
                    .strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/')))
    };
    if allowed.iter().any(under) {
        Ok(())
    } else {
        Err(SourceRefused::NotAllowed {
            source_url: redacted,
            allowed: if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            },
        })
    }
}

/// The directory a `file://` source named by a request must stay beneath, links resolved: the
/// longest allowed `file://` prefix it is under. `None` for other sources and for sources under
/// no allowed prefix (those a request cannot name).
pub fn confining_dir(source: &str, allowed: &[String]) -> Option<std::path::PathBuf> {
    let path = source.strip_prefix("file://")?;
    allowed
        .iter()
        .filter_map(|prefix| prefix.strip_prefix("file://"))
        .map(|dir| dir.trim_end_matches('/'))
        .filter(|dir| {
            !dir.is_empty()
                && (path == *dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/')))
        })
        .max_by_key(|dir| dir.len())
        .map(std::path::PathBuf::from)
}

/// `%XX` decoded (invalid escapes kept as they are), so `%2e%2e` is seen as `..`.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'%'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        for source in ["file:///etc", "file:///var/run/secrets", "az://models/x"] {
            let err = check_allowed(source, &[]).unwrap_err();
            assert!(
                err.to_string().contains("api.allowed_sources (none)"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_prefix_allows_what_is_below_it_as_a_directory_only() {
        let list = allowed(&["file:///mnt/models/", "az://models"]);
        check_allowed("file:///mnt/models/llama", &list).unwrap();
        check_allowed("az://models/llama-8b", &list).unwrap();
        check_allowed("az://models", &list).unwrap();
        assert!(check_allowed("file:///mnt/models-private/x", &list).is_err());
        assert!(check_allowed("az://modelsx/y", &list).is_err());
        assert!(check_allowed("file:///etc", &list).is_err());
        assert!(check_allowed("https://evil.blob.core.windows.net/models/x", &list).is_err());
    }

    #[test]
    fn dot_segments_cannot_climb_out_of_a_prefix() {
        let list = allowed(&["file:///mnt/models/"]);
        for source in [
            "file:///mnt/models/../../etc",
            "file:///mnt/models/%2e%2e/%2E%2E/etc",
            "file:///mnt/models/./x",
        ] {
            assert!(
                matches!(
                    check_allowed(source, &list),
                    Err(SourceRefused::DotSegments { .. })
                ),
                "{source}"
            );
        }
    }

    #[test]
    fn secrets_in_a_refused_url_are_not_echoed() {
        let err =
            check_allowed("https://a.blob.core.windows.net/c/m?sv=1&sig=SECRET", &[]).unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }
}
