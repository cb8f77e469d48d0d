//! This node's pods, as the agent sees them from the host: whether a pod still runs (its
//! leases hold while it does) and which pod a process belongs to (a reader on the readers'
//! socket is identified, not taken at its word).
//!
//! The kubelet puts every pod in a cgroup of its own, named after the pod's UID, and removes it
//! when the pod's containers have all stopped: when a Job's pod succeeds, when a pod is evicted,
//! or when it is deleted. The pod's directory under `/var/lib/kubelet/pods` stays until the pod
//! object is deleted, which for Succeeded, Failed and evicted pods can be hours or never (the
//! `terminated-pod-gc-threshold`). So a pod runs while its cgroup exists; the directory is the
//! fallback for a node whose cgroups the agent cannot see.
//!
//! Both cgroup drivers name the pod's cgroup after its UID:
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID with _>.slice`
//! - cgroupfs: `kubepods/burstable/pod<UID>`
//!
//! (with `besteffort`, or no QoS level for Guaranteed pods). The agent reads `/proc/PID/cgroup`
//! of a peer and looks for such a segment; it needs the host's PID namespace to see the peer's
//! process (`hostPID: true`), and reads the host's cgroup tree at `leases.cgroup_root`.

use std::path::{Path, PathBuf};

use crate::store::leases::PodUid;

/// Whether a pod runs on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Its cgroup (or, without visible cgroups, its kubelet directory) exists.
    Running,
    /// It has stopped, or was never here.
    Gone,
    /// Neither the pods' cgroups nor their directories are visible: nothing can be judged.
    Unknown,
}

/// How the agent tells which pods run: the host's cgroup tree, `/proc`, and the kubelet's pod
/// directories, each as the agent's container sees it.
#[derive(Debug, Clone)]
pub struct Pods {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
    pods_dir: PathBuf,
}

/// Why a peer's pod could not be told.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer's PID is not visible here (pid 0 from `SO_PEERCRED`).
    #[error(
        "the reader's process is not visible to the agent (it runs in another PID namespace; the agent needs the host's: hostPID: true, as the DaemonSet sets)"
    )]
    NotVisible,
    /// `/proc/PID/cgroup` could not be read (the process ended).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Which layout the node's pod cgroups follow, if the agent can see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Systemd,
    Cgroupfs,
}

impl Pods {
    /// The pods seen through these roots.
    pub fn new(cgroup_root: &Path, proc_root: &Path, pods_dir: &Path) -> Self {
        Self {
            cgroup_root: cgroup_root.to_path_buf(),
            proc_root: proc_root.to_path_buf(),
            pods_dir: pods_dir.to_path_buf(),
        }
    }

    fn driver(&self) -> Option<Driver> {
        if self.cgroup_root.join("kubepods.slice").is_dir() {
            Some(Driver::Systemd)
        } else if self.cgroup_root.join("kubepods").is_dir() {
            Some(Driver::Cgroupfs)
        } else {
            None
        }
    }

    /// How liveness is judged here, for the log and `agent --check`.
    pub fn describe(&self) -> String {
        match self.driver() {
            Some(_) => format!(
                "a lease holds while its pod's cgroup exists under {}",
                self.cgroup_root.display()
            ),
            None if self.pods_dir.is_dir() => format!(
                "no pod cgroups under {} (leases.cgroup_root): a lease holds while {}/POD_UID exists, which outlives a pod that stopped until the pod is deleted",
                self.cgroup_root.display(),
                self.pods_dir.display()
            ),
            None => format!(
                "neither pod cgroups under {} (leases.cgroup_root) nor {} (leases.pods_dir) are visible: no lease ever ends and no reader can name its pod",
                self.cgroup_root.display(),
                self.pods_dir.display()
            ),
        }
    }

    /// Whether `pod` runs on this node.
    pub fn liveness(&self, pod: &PodUid) -> Liveness {
        let found = |paths: Vec<PathBuf>| {
            if paths.iter().any(|p| p.is_dir()) {
                Liveness::Running
            } else {
                Liveness::Gone
            }
        };
        match self.driver() {
            Some(driver) => found(cgroup_paths(&self.cgroup_root, driver, pod)),
            None if self.pods_dir.is_dir() => found(vec![self.pods_dir.join(pod.as_str())]),
            None => Liveness::Unknown,
        }
    }

    /// When `pod` started here, as far as this boot of the node is concerned: the birth time
    /// of its directory under `leases.pods_dir`, which the kubelet makes as it admits the pod,
    /// before any image pull or container, or the node's boot when the directory is older (a
    /// reboot keeps it, and the pod's containers start again). `None` where the filesystem
    /// keeps no birth time: the modification time moves when the first container starts, after
    /// its image pull, and would hide exactly the time a reader wants to see.
    pub fn started(&self, pod: &PodUid) -> Option<std::time::SystemTime> {
        let born = std::fs::metadata(self.pods_dir.join(pod.as_str()))
            .ok()?
            .created()
            .ok()?;
        Some(match node_booted(&self.proc_root) {
            Some(boot) if boot > born => boot,
            _ => born,
        })
    }

    /// The pod process `pid` belongs to, if it is in one.
    pub fn pod_of_process(&self, pid: i32) -> Result<Option<PodUid>, PeerError> {
        if pid <= 0 {
            return Err(PeerError::NotVisible);
        }
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = std::fs::read_to_string(&path).map_err(|source| PeerError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(pod_in_cgroup_file(&text))
    }
}

/// When the node booted: `btime` in `/proc/stat`.
fn node_booted(proc_root: &Path) -> Option<std::time::SystemTime> {
    let text = std::fs::read_to_string(proc_root.join("stat")).ok()?;
    let seconds: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(seconds))
}

/// Where the pod's cgroup is under each QoS class, for one driver.
fn cgroup_paths(root: &Path, driver: Driver, pod: &PodUid) -> Vec<PathBuf> {
    match driver {
        Driver::Systemd => {
            let uid = pod.as_str().replace('-', "_");
            let top = root.join("kubepods.slice");
            vec![
                top.join(format!("kubepods-pod{uid}.slice")),
                top.join("kubepods-burstable.slice")
                    .join(format!("kubepods-burstable-pod{uid}.slice")),
                top.join("kubepods-besteffort.slice")
                    .join(format!("kubepods-besteffort-pod{uid}.slice")),
            ]
        }
        Driver::Cgroupfs => {
            let top = root.join("kubepods");
            let name = format!("pod{}", pod.as_str());
            vec![
                top.join(&name),
                top.join("burstable").join(&name),
                top.join("besteffort").join(&name),
            ]
        }
    }
}

/// The pod named by a `/proc/PID/cgroup` file: the unified (`0::`) line first, then any other.
/// The paths may be relative to the reader's cgroup namespace (`/../..`); the pod's segment
/// is in them either way.
fn pod_in_cgroup_file(text: &str) -> Option<PodUid> {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_by_key(|l| !l.starts_with("0::"));
    lines.iter().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/').find_map(pod_in_segment)
    })
}

/// The pod UID in one cgroup path segment: `kubepods-besteffort-pod<uid_>.slice`,
/// `kubepods-pod<uid_>.slice` or `pod<uid>`.
fn pod_in_segment(segment: &str) -> Option<PodUid> {
    let stem = segment.strip_suffix(".slice").unwrap_or(segment);
    let uid = if let Some(rest) = stem.strip_prefix("kubepods-") {
        let at = rest.rfind("pod")?;
        rest[at + 3..].replace('_', "-")
    } else {
        stem.strip_prefix("pod")?.to_string()
    };
    // A Kubernetes UID is an RFC 4122 UUID: 36 characters, hex digits and four dashes.
    let is_uuid = uid.len() == 36
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && uid.bytes().filter(|b| *b == b'-').count() == 4;
    is_uuid.then(|| PodUid::new(&uid).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "4b0c2a36-9f5e-4b8e-8a63-1f2d3c4b5a69";

    #[test]
    fn a_pod_is_found_in_either_drivers_cgroup_paths() {
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod4b0c2a36_9f5e_4b8e_8a63_1f2d3c4b5a69.slice/cri-containerd-0123abcd.scope\n";
        assert_eq!(pod_in_cgroup_file(systemd).unwrap().as_str(), UID);
        let guaranteed =
            "0::/kubepods.slice/kubepods-pod4b0c2a36_9f5e_4b8e_8a63_1f2d3c4b5a69.slice/x.scope";
        assert_eq!(pod_in_cgroup_file(guaranteed).unwrap().as_str(), UID);
        let cgroupfs = format!(
            "12:memory:/kubepods/burstable/pod{UID}/0123abcd\n0::/kubepods/burstable/pod{UID}/0123abcd\n"
        );
        assert_eq!(pod_in_cgroup_file(&cgroupfs).unwrap().as_str(), UID);
        // Seen from inside another cgroup namespace.
        let relative = format!(
            "0::/../../kubepods-burstable-pod{}.slice/cri-containerd-1.scope",
            UID.replace('-', "_")
        );
        assert_eq!(pod_in_cgroup_file(&relative).unwrap().as_str(), UID);
    }

    #[test]
    fn a_pod_older_than_the_nodes_boot_started_at_the_boot() {
        let dir = tempfile::tempdir().unwrap();
        let pod = PodUid::new(UID).unwrap();
        std::fs::create_dir_all(dir.path().join("pods").join(UID)).unwrap();
        std::fs::create_dir(dir.path().join("proc")).unwrap();
        let pods = Pods::new(
            &dir.path().join("cgroup"),
            &dir.path().join("proc"),
            &dir.path().join("pods"),
        );
        let stat = |btime: u64| {
            std::fs::write(
                dir.path().join("proc/stat"),
                format!("cpu  1 2 3\nbtime {btime}\nprocesses 9\n"),
            )
            .unwrap();
        };
        let Some(born) = pods.started(&pod) else {
            // This filesystem keeps no birth times: nothing to compare.
            return;
        };
        // Booted long before the pod's directory appeared: the directory's time.
        stat(1_000);
        assert_eq!(pods.started(&pod), Some(born));
        // Booted after it (the directory outlived a reboot): the boot.
        let later = born
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3_600;
        stat(later);
        assert_eq!(
            pods.started(&pod),
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(later))
        );
        assert_eq!(
            pods.started(&PodUid::new(&UID.replace('4', "5")).unwrap()),
            None
        );
    }

    #[test]
    fn processes_outside_pods_name_none() {
        for text in [
            "0::/system.slice/kubelet.service\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "0::/kubepods.slice/kubepods-besteffort.slice\n",
            "0::/podnotauuid/x\n",
            "0::/kubepods-pod../x\n",
            "garbage",
            "",
        ] {
            assert_eq!(pod_in_cgroup_file(text), None, "{text:?}");
        }
    }

    #[test]
    fn liveness_follows_the_cgroup_not_the_kubelet_directory() {
        let root = tempfile::tempdir().unwrap();
        let (cgroups, pods) = (root.path().join("cgroup"), root.path().join("pods"));
        std::fs::create_dir_all(pods.join(UID)).unwrap();
        let p = Pods::new(&cgroups, Path::new("/proc"), &pods);
        let uid = PodUid::new(UID).unwrap();
        // No cgroups visible: the directory decides.
        assert_eq!(p.liveness(&uid), Liveness::Running);
        let slice = cgroups.join("kubepods.slice/kubepods-burstable.slice");
        std::fs::create_dir_all(&slice).unwrap();
        // Cgroups visible: the pod stopped although its directory stays.
        assert_eq!(p.liveness(&uid), Liveness::Gone);
        let pod = slice.join(format!(
            "kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        ));
        std::fs::create_dir(&pod).unwrap();
        assert_eq!(p.liveness(&uid), Liveness::Running);
        let nothing = Pods::new(
            &root.path().join("x"),
            Path::new("/proc"),
            &root.path().join("y"),
        );
        assert_eq!(nothing.liveness(&uid), Liveness::Unknown);
    }

    #[test]
    fn a_process_outside_this_pid_namespace_is_not_visible() {
        let p = Pods::new(
            Path::new("/nonexistent"),
            Path::new("/proc"),
            Path::new("/x"),
        );
        assert!(matches!(p.pod_of_process(0), Err(PeerError::NotVisible)));
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(p.pod_of_process(me).unwrap(), None);
    }
}
