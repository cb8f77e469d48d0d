//! Page-cache warming of a newly published model, when the policy says so.

use std::path::Path;
use std::time::Instant;

use tracing::{info, warn};

use super::{Models, WarmReport, millis};
use crate::config::agent::WarmPolicy;
use crate::config::human_bytes;
use crate::store::ModelName;

impl Models {
    /// Reads a newly published model into the page cache when the policy says so.
    pub(super) async fn warm(&self, name: &ModelName, revision: &str, bytes: u64) {
        let ram = mem_total(&self.config.proc_root);
        let wanted = match self.config.warm {
            WarmPolicy::Off => false,
            WarmPolicy::On => true,
            #[expect(clippy::cast_precision_loss, reason = "a ratio")]
            WarmPolicy::Auto(f) => ram.is_some_and(|r| (bytes as f64) <= r as f64 * f),
        };
        if !wanted {
            info!(model.name = %name, "{name}: page-cache warming skipped (policy {:?}, model {}, RAM {})", self.config.warm, human_bytes(bytes), ram.map_or("unknown".into(), human_bytes));
            return;
        }
        let dir = self.layout.revision_dir(name, revision);
        let started = Instant::now();
        let result =
            tokio::task::spawn_blocking(move || crate::store::read_into_page_cache(&dir)).await;
        match result {
            Ok(Ok(read)) => {
                let seconds = started.elapsed().as_secs_f64();
                #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
                let rate = read as f64 / seconds.max(0.001) / 1e9;
                info!(model.name = %name, phase = "warm", duration_ms = millis(started.elapsed()), size_bytes = read, "{name}: read {} into the page cache in {seconds:.1} s ({rate:.2} GB/s)", human_bytes(read));
                self.metrics.phase("warm", started.elapsed());
                if let Some(e) = self.lock().get_mut(name.as_str()) {
                    e.warm = Some(WarmReport {
                        bytes: read,
                        seconds,
                    });
                }
            }
            Ok(Err(e)) => warn!(model.name = %name, "{name}: page-cache warming failed: {e}"),
            Err(e) => warn!(model.name = %name, "{name}: page-cache warming failed: {e}"),
        }
    }
}

/// `MemTotal` from `PROC/meminfo`, in bytes.
fn mem_total(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("meminfo")).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_from_the_given_proc_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:       24684084 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        assert_eq!(mem_total(dir.path()), Some(24_684_084 * 1024));
        assert_eq!(mem_total(&dir.path().join("none")), None);
    }
}
