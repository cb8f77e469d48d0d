#!/bin/bash
# One boot of a GPU node, run inside a VM (a real kernel with md, NVMe and cgroup v2) by the
# `vm` integration test: the node's /mnt and kubelet pod directories, the modelcache DaemonSet
# pod (its own mount namespace, the hostPath at the cache root with Bidirectional propagation,
# an emptyDir at its private mount point, /dev and /sys, its memory limit as a cgroup v2 group,
# the ConfigMap's config.toml at /etc/modelcache), and a vLLM pod (its own mount namespace, the
# hostPath read-only with HostToContainer propagation, an emptyDir for the model link, its own
# cgroup) whose init container runs the example's exact `wait` command as the example's user
# while the agent works, and whose "server" reads every tensor through the link with
# safetensors' safe_open.
#
# Usage: node-boot.sh SHARE. SHARE/env.sh sets the variables below; results are written to
# SHARE/results.txt as KEY=VALUE lines, logs beside it. The VM powers off when this returns.
set -u
SHARE=$1
. "$SHARE/env.sh"
# From env.sh: MC (the modelcache binary), PY (python with safetensors), CONSUMER (its script),
# SOURCE (the model's original files), MODEL, POD_MOUNT (the vLLM pod's mount path of the
# cache), LINK_MOUNT (its emptyDir's), PRIVATE (the agent's private mount point), PODS (the
# kubelet's pod directories), INIT_USER (the init container's uid), AGENT_MEMORY_MAX,
# INIT_MEMORY_MAX. One item a line: SHARE/agent.args (the DaemonSet's arguments),
# SHARE/agent.env (its environment, NAME=VALUE), SHARE/init.args (the example's init container
# arguments, with $(NODE_IP) and $(POD_UID) left for this script).
mapfile -t AGENT_ARGS < "$SHARE/agent.args"
mapfile -t AGENT_ENV < "$SHARE/agent.env"
mapfile -t INIT_ARGS < "$SHARE/init.args"
# SHARE/boot.env: MEASURE_PAGECACHE=1 on the boot that measures the page cache and restarts the
# agent, READ_TENSORS=0 on boots that only need the init container's wait (reading every tensor
# is slow emulated).
MEASURE_PAGECACHE=0
READ_TENSORS=1
[ -e "$SHARE/boot.env" ] && . "$SHARE/boot.env"

R=$SHARE/results.txt
: > "$R"
say() { printf '%s=%s\n' "$1" "$2" >> "$R"; }
up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }'; }

say BOOTED_AT "$(up)"
# What a node's initramfs and udev do at boot: load the drivers; udev then assembles any md
# array it finds on the disks, before any pod runs.
modprobe nvme
modprobe raid0
udevadm settle -t 60
sleep 1
udevadm settle -t 60
say MDSTAT_AT_BOOT "$(grep -E '^md' /proc/mdstat | tr '\n' ';')"
say MD_LINK_AT_BOOT "$(readlink /dev/md/modelcache 2>/dev/null)"

# The user-mode network: the host's 127.0.0.1:PORT is 10.0.2.2:PORT here; the node's address is
# what the downward API's status.hostIP gives the vLLM pod.
NODE_IP=10.0.2.15
ip link set enp0s10 up
ip addr add $NODE_IP/24 dev enp0s10
ip route add default via 10.0.2.2

# The node: /mnt is its own filesystem (on AKS, the temporary disk); the host path is a shared
# mount, as kubelet requires of a Bidirectional hostPath (systemd makes / shared on a real node).
# /var/lib holds the kubelet's pod directories.
mount -t tmpfs -o size=64m node-mnt /mnt
mkdir -p /mnt/modelcache
mount --bind /mnt/modelcache /mnt/modelcache
mount --make-shared /mnt/modelcache
mount -t tmpfs -o size=16m node-var-lib /var/lib
mkdir -p "$PODS" "$PRIVATE" /etc/modelcache /run/vllm-pod
cp "$SHARE/config.toml" /etc/modelcache/config.toml

# cgroup v2 groups: the agent with the DaemonSet's memory limit, the vLLM pod with its init
# container's limit.
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
mkdir -p /sys/fs/cgroup/modelcache-agent /sys/fs/cgroup/vllm-pod
echo "$AGENT_MEMORY_MAX" > /sys/fs/cgroup/modelcache-agent/memory.max
echo +memory > /sys/fs/cgroup/vllm-pod/cgroup.subtree_control
mkdir -p /sys/fs/cgroup/vllm-pod/init /sys/fs/cgroup/vllm-pod/server
echo "$INIT_MEMORY_MAX" > /sys/fs/cgroup/vllm-pod/init/memory.max

# The vLLM pod, scheduled before the cache is mounted: its mounts are slaves of the node's
# (HostToContainer), the host path read-only at its mount path, an emptyDir (writable by its
# user) at its link's mount path.
POD=/run/vllm-pod$POD_MOUNT
LINKS=/run/vllm-pod$LINK_MOUNT
mkdir -p "$POD" "$LINKS"
chmod 0777 "$LINKS"
unshare -m --propagation unchanged bash -c '
  mount --make-rslave / && mount --bind /mnt/modelcache "$0" &&
  mount -o remount,bind,ro "$0" && touch /run/vllm-pod/.ready && exec sleep 3600' "$POD" &
VLLM=$!
while [ ! -e /run/vllm-pod/.ready ]; do
  kill -0 $VLLM 2>/dev/null || { say ERROR "the vLLM pod's namespace did not start"; exit 1; }
  sleep 0.1
done
in_vllm() { local group=$1; shift; nsenter -t $VLLM -m sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "/sys/fs/cgroup/vllm-pod/$group" "$@"; }

# The agent's pod: privileged, the node's /dev, the node's /sys read-only (the DaemonSet's
# `readOnly: true` hostPath: the top mount read-only, its submounts such as the cgroup
# filesystem as they are), the host path at /mnt/modelcache as a peer of the node's
# (Bidirectional: its mountinfo shows a bind of the directory, shared), an emptyDir at its
# private mount point, in its memory cgroup, started with the DaemonSet's arguments. mdadm
# --create writes /sys/module/md_mod/parameters/new_array where it can; here it cannot.
start_agent() {
  env -i PATH="$PATH" "${AGENT_ENV[@]}" unshare -m --propagation unchanged bash -c '
    mount --bind "$0" "$0" && mount --make-private "$0" &&
    mount -t tmpfs -o size=1m emptydir "$0" && mount --make-private "$0" &&
    mount -o remount,bind,ro /sys || exit 1
    # The probe is meant to fail: its error is what the test reads.
    { findmnt -n -o OPTIONS /sys; echo md_probe > /sys/module/md_mod/parameters/new_array || true; } > "$1" 2>&1
    shift
    echo $$ > /sys/fs/cgroup/modelcache-agent/cgroup.procs && exec "$@"' \
    "$PRIVATE" "$SHARE/agent-sys.txt" "$MC" "${AGENT_ARGS[@]}" >> "$SHARE/agent.log" 2>&1 &
  AGENT=$!
}
# /healthz answers from the start; /readyz once the model is ready (or never, this boot).
until_ready() {
  local ready=0
  for _ in $(seq 1 2400); do
    if curl -sf -o /dev/null http://127.0.0.1:8080/readyz; then ready=1; break; fi
    kill -0 $AGENT 2>/dev/null || break
    sleep 0.25
  done
  echo $ready
}
# The init container: the example's exact arguments, as its user, in the vLLM pod's namespace
# and init cgroup, for the pod with UID $1 (its kubelet directory made first).
start_init() {
  local uid=$1 args=()
  mkdir -p "$PODS/$uid"
  for a in "${INIT_ARGS[@]}"; do
    a=${a//\$(NODE_IP)/$NODE_IP}
    args+=("${a//\$(POD_UID)/$uid}")
  done
  in_vllm init setpriv --reuid="$INIT_USER" --regid="$INIT_USER" --clear-groups \
    timeout 600 "$MC" "${args[@]}" > "$SHARE/$2" 2>&1 &
  INIT=$!
}
write_probe() {
  in_vllm server sh -c "echo x > '$POD/.write-probe'" 2>&1 && echo allowed
  rm -f /mnt/modelcache/.write-probe 2>/dev/null
}

AGENT_STARTED=$(up)
start_agent
# The pod's init container starts at once, beside the agent, as on a node that just joined.
start_init pod-1-uid init.log
ready=$(until_ready)
say AGENT_READY "$ready"
# What the agent's mount namespace showed at /sys, and how a write there failed.
say AGENT_SYS "$(tr '\n' ';' < "$SHARE/agent-sys.txt")"
say AGENT_START_TO_READY_SECONDS "$(since "$AGENT_STARTED")"
say BOOT_TO_READY_SECONDS "$(up)"
wait $INIT
say INIT_EXIT "$?"
# The line the init container ends with: from the pod's start to serving, and where it went.
say WAIT_LINE "$(tail -n 1 "$SHARE/init.log")"
say DISK "$(curl -s http://127.0.0.1:8080/v1/disk | tr -d '\n')"
say MODEL "$(curl -s "http://127.0.0.1:8080/v1/models/$MODEL" | tr -d '\n')"
say MDSTAT_AFTER "$(grep -E '^md' /proc/mdstat | tr '\n' ';')"
say NODE_MOUNT "$(findmnt -n -o SOURCE,FSTYPE,OPTIONS /mnt/modelcache | tail -1)"
LINK=$LINKS/$MODEL
say LINK "$(readlink "$LINK")"

if [ "$ready" = 1 ]; then
  files=$(find "/mnt/modelcache/models/$MODEL/" -type f -name '*.safetensors')
  say PAGECACHE_AFTER_INIT "$(fincore -b -n -o RES,SIZE $files | awk '{r+=$1; s+=$2} END {print r" "s}')"

  # The "server": every tensor through the link, against the source.
  if [ "$READ_TENSORS" = 1 ]; then
    in_vllm server "$PY" "$CONSUMER" "$LINK" "$SOURCE" > "$SHARE/consumer.log" 2>&1
    say CONSUMER_EXIT "$?"
  fi
  # Root in the vLLM pod, which started before the agent, cannot write to the cache.
  say VLLM_WRITE "$(write_probe)"

  if [ "$MEASURE_PAGECACHE" = 1 ]; then
    # The agent restarts (a DaemonSet rollout): ready again at once, the cache still
    # read-only for the pod, and the agent still writing: a second pod (a restart of the vLLM
    # pod, a new UID) gets its lease recorded, from a cold page cache.
    kill -TERM $AGENT; wait $AGENT
    say AGENT_RESTART_EXIT "$?"
    restarted=$(up)
    start_agent
    say AGENT_READY_AFTER_RESTART "$(until_ready)"
    say AGENT_RESTART_TO_READY_SECONDS "$(since "$restarted")"
    say VLLM_WRITE_AFTER_RESTART "$(write_probe)"
    sync; echo 3 > /proc/sys/vm/drop_caches
    say PAGECACHE_COLD "$(fincore -b -n -o RES,SIZE $files | awk '{r+=$1; s+=$2} END {print r" "s}')"
    init_started=$(up)
    start_init pod-2-uid init-2.log
    wait $INIT
    say INIT_2_EXIT "$?"
    say INIT_2_SECONDS "$(since "$init_started")"
    say PAGECACHE_AFTER_INIT_2 "$(fincore -b -n -o RES,SIZE $files | awk '{r+=$1; s+=$2} END {print r" "s}')"
    say LEASE_2 "$(cat "/mnt/modelcache/leases/$MODEL/pod-2-uid" 2>&1)"

    # Why the agent does not warm: cgroup v2 charges page cache to the reader and reclaims it
    # at the reader's limit. A reader whose memory.max is a quarter of the model (as 1 GiB is
    # of far less than 65 GB) keeps at most that much of it cached.
    sync; echo 3 > /proc/sys/vm/drop_caches
    mkdir -p /sys/fs/cgroup/small-reader
    size=$(fincore -b -n -o SIZE $files | awk '{s+=$1} END {print s}')
    echo $((size / 4)) > /sys/fs/cgroup/small-reader/memory.max
    sh -c 'echo $$ > /sys/fs/cgroup/small-reader/cgroup.procs && exec cat "$@"' sh $files > /dev/null
    say PAGECACHE_SMALL_READER "$(fincore -b -n -o RES,SIZE $files | awk '{r+=$1; s+=$2} END {print r" "s}')"
  fi
fi

kill -TERM $AGENT 2>/dev/null
wait $AGENT
say AGENT_EXIT "$?"
kill $VLLM 2>/dev/null
sync
say DONE 1
