//! The bearer token that allows state-changing requests on the read listener. A token file is
//! re-read whenever it changes, so a rotated Kubernetes secret takes effect without a restart,
//! and a file that can no longer be read refuses every request (fails closed).

use std::os::unix::fs::MetadataExt as _;
use std::sync::Mutex;

use tracing::{info, warn};

use crate::config::agent::{Token, TokenSource, read_token_file};

/// What identifies one version of the token file: Kubernetes swaps a symlink to a new
/// directory, so the inode changes; an in-place edit changes the mtime or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

/// The configured token, current.
#[derive(Debug)]
pub struct Bearer {
    source: TokenSource,
    /// The file's last-seen version (`None`: missing) and the token it held (`None`:
    /// unreadable or empty).
    cached: Mutex<Option<(Option<Stamp>, Option<Token>)>>,
}

/// Why no request can be authorised right now.
#[derive(Debug, thiserror::Error)]
#[error("the token file {0} cannot be read or is empty")]
pub struct TokenUnavailable(pub String);

impl Bearer {
    /// A bearer guard for `source`.
    pub fn new(source: TokenSource) -> Self {
        Self {
            source,
            cached: Mutex::new(None),
        }
    }

    /// Whether `presented` is the current token.
    pub fn allows(&self, presented: &str) -> Result<bool, TokenUnavailable> {
        match &self.source {
            TokenSource::Fixed(token) => Ok(token.matches(presented)),
            TokenSource::File(path) => {
                // `None`: the file is gone; cached like any other version, so a client that
                // keeps presenting a token while it is missing does not flood the log.
                let stamp = std::fs::metadata(path).ok().map(|m| Stamp {
                    dev: m.dev(),
                    ino: m.ino(),
                    mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                    len: m.len(),
                });
                let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
                let token = match cached.as_ref() {
                    Some((seen, token)) if *seen == stamp => token.clone(),
                    previous => {
                        let token = match read_token_file(path) {
                            Ok(token) => Some(token),
                            Err(e) => {
                                warn!(
                                    "{e}: refusing state-changing requests on listen.read until it is fixed"
                                );
                                None
                            }
                        };
                        if previous.is_some() && token.is_some() {
                            info!(
                                "the token file {} changed: using the new token",
                                path.display()
                            );
                        }
                        *cached = Some((stamp, token.clone()));
                        token
                    }
                };
                token
                    .map(|t| t.matches(presented))
                    .ok_or_else(|| TokenUnavailable(path.display().to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_token_file_takes_effect_and_a_missing_one_refuses() {
        let dir = tempfile::tempdir().unwrap();
        // The layout Kubernetes uses: token -> ..data/token, ..data -> a timestamped directory.
        let first = dir.path().join("..2026_01");
        std::fs::create_dir(&first).unwrap();
        std::fs::write(first.join("token"), "one\n").unwrap();
        std::os::unix::fs::symlink("..2026_01", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.path().join("token")).unwrap();
        let bearer = Bearer::new(TokenSource::File(dir.path().join("token")));
        assert!(bearer.allows("one").unwrap());
        assert!(!bearer.allows("two").unwrap());

        let second = dir.path().join("..2026_02");
        std::fs::create_dir(&second).unwrap();
        std::fs::write(second.join("token"), "two\n").unwrap();
        std::os::unix::fs::symlink("..2026_02", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert!(bearer.allows("two").unwrap());
        assert!(!bearer.allows("one").unwrap());

        std::fs::write(second.join("token"), "").unwrap();
        assert!(bearer.allows("two").is_err(), "an emptied file refuses");
        std::fs::remove_file(dir.path().join("token")).unwrap();
        assert!(bearer.allows("two").is_err(), "a removed file refuses");
    }
}
