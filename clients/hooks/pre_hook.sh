#!/usr/bin/env bash
# Jenkins pre-build step: check out nodes for this build and write what the job needs.
#   pre_hook.sh [COUNT] [POOL]      (default: 1 node of pool "default")
# Writes into $WORKSPACE (else the current directory), each file mode 600 (they hold
# IPMI passwords):
#   molteniron-nodes.json  the allocate reply, exactly as `molteniron allocate` prints it
#   hardware_info          one line per node: IPMI_IP MAC IPMI_USER IPMI_PASSWORD
#   localrc                devstack's fragment: IRONIC_HW_ARCH, IRONIC_HW_NODE_CPU,
#                          IRONIC_HW_NODE_RAM, IRONIC_HW_NODE_DISK and ALLOCATION_POOL
#                          ("start=IP,end=IP --allocation-pool start=IP,end=IP", one
#                          range per IP of the node's allocation pool)
# With several nodes, localrc describes all of them at once, as devstack enrolls every
# line of hardware_info with the same IRONIC_HW_* values: the first node's arch, the
# smallest CPU count, RAM and disk among the nodes (so one flavor fits every node), and
# every node's IPs in hardware_info's order. Nodes come in the order of their ids.
# Files of an earlier build are removed first. The new ones are written aside and
# renamed into place only once all three are complete: the hook exits 0 with all of
# them, or non-zero with none (not the error reply, not an empty file after Ctrl-C).
#
# Owner: $MOLTENIRON_OWNER, else Jenkins' $BUILD_TAG (post_hook.sh uses the same).
# MOLTENIRON_WAIT: longest wait for nodes (default 3600 s); MOLTENIRON_LEASE: how long
# the nodes stay this build's (default: the worker's lease_seconds). When each lease
# ends is printed on stderr.
# SIGTERM or SIGINT to this script alone (not only to its process group) cancels a
# waiting allocate at once.
# Exit codes are molteniron's: 0 nodes written; 1 refused (e.g. the pool is too small);
# 2 usage or configuration (the broker refused the login, the vhost or a permission, or
# its certificate is not trusted); 3 no nodes came within MOLTENIRON_WAIT; 4 no broker,
# or no worker answered (at once when none consumes the requests); 130 interrupted
# (the waiting allocate is cancelled first).
set -euo pipefail
owner=${MOLTENIRON_OWNER:-${BUILD_TAG:?set MOLTENIRON_OWNER or run under Jenkins}}
workspace=${WORKSPACE:-.}
files=(molteniron-nodes.json hardware_info localrc)
if ! cli=$(command -v molteniron); then
  echo "molteniron: the molteniron command is not on PATH" >&2
  exit 2
fi
# The CLI's own python (through a link such as /usr/local/bin/molteniron into its venv);
# plain python3 otherwise: only the json module is needed.
python="$(dirname "$(readlink -f "$cli")")/python3"
[ -x "$python" ] || python=python3

umask 077
# An old file keeps its old mode when it is overwritten, and a stale one would describe
# nodes this build does not hold. (.molteniron-pre-hook.*: left by a pre-hook killed -9.)
for name in "${files[@]}"; do rm -f "$workspace/$name"; done
rm -rf "$workspace"/.molteniron-pre-hook.*
aside=$(mktemp -d "$workspace/.molteniron-pre-hook.XXXXXX")
finish() {
  local status=$?
  trap - EXIT
  rm -rf "$aside"
  if [ "$status" -ne 0 ]; then
    for name in "${files[@]}"; do rm -f "$workspace/$name"; done
  fi
  exit "$status"
}
trap finish EXIT
# The allocate runs in the background and is waited for: bash runs a trap only between
# commands, so a foreground allocate would hold a signal to this script until it
# returned (up to MOLTENIRON_WAIT). The signal is passed on as SIGTERM (SIGINT is ignored
# by a background process); molteniron cancels the waiting allocate and exits 130.
interrupted() {
  trap '' TERM INT  # one is enough: molteniron is cancelling
  local running
  running=$(jobs -p)
  if [ -n "$running" ]; then
    kill -TERM $running 2> /dev/null || true
    wait $running || true
  fi
  exit 130
}
trap interrupted TERM INT
molteniron allocate "$owner" "${1:-1}" "${2:-default}" --wait "${MOLTENIRON_WAIT:-3600}" \
  ${MOLTENIRON_LEASE:+--lease "$MOLTENIRON_LEASE"} > "$aside/molteniron-nodes.json" &
wait $!

"$python" - "$aside" "$workspace" "$owner" <<'PYTHON'
import json
import os
import re
import shlex
import sys

aside, workspace, owner = sys.argv[1:]
with open(os.path.join(aside, "molteniron-nodes.json")) as f:
    nodes = sorted(json.load(f)["nodes"].values(), key=lambda node: node["id"])
facts = [{**json.loads(node["blob"]), **node,
          "ips": [ip for ip in node["allocation_pool"].split(",") if ip]} for node in nodes]


def warn(message):
    print(f"molteniron: WARNING: {message}", file=sys.stderr)


def write(name, lines):
    fd = os.open(os.path.join(aside, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(line + "\n" for line in lines)


hardware_info = []
for node in facts:
    columns = {key: str(node.get(key, "")) for key in
               ("ipmi_ip", "port_hwaddr", "ipmi_user", "ipmi_password")}
    for key, value in columns.items():
        if not value or re.search(r"\s", value):  # never print the value: it may be the password
            warn(f"{node['name']}: {key} is empty or holds blanks; hardware_info's columns "
                 "will be misread")
    hardware_info.append(" ".join(columns.values()))

arches = {node.get("cpu_arch", "") for node in facts}
if len(arches) > 1:
    warn(f"the nodes differ in cpu_arch ({', '.join(sorted(arches))}); localrc says the first's")
ranges = " --allocation-pool ".join(f"start={ip},end={ip}" for node in facts for ip in node["ips"])
if not ranges:
    warn("the nodes have no allocation pool; ALLOCATION_POOL is empty")
# The original's users wrote ALLOCATION_POOL="..." by hand; keep that form unless an IP
# holds characters a shell would read.
allocation_pool = f'"{ranges}"' if re.fullmatch(r"[\w.:,=/ -]*", ranges) else shlex.quote(ranges)
write("localrc", [
    f"IRONIC_HW_ARCH={shlex.quote(facts[0].get('cpu_arch', ''))}",
    f"IRONIC_HW_NODE_CPU={min(int(node.get('cpus', 0)) for node in facts)}",
    f"IRONIC_HW_NODE_RAM={min(int(node.get('ram_mb', 0)) for node in facts)}",
    f"IRONIC_HW_NODE_DISK={min(int(node.get('disk_gb', 0)) for node in facts)}",
    f"ALLOCATION_POOL={allocation_pool}",
])
write("hardware_info", hardware_info)

for node in facts:
    print(f"molteniron: {node['name']} is leased to {owner} until "
          f"{node.get('lease_expires_at') or 'unknown'} (molteniron renew {owner} to extend)",
          file=sys.stderr)
# All three are complete: in place they go, each by a rename within the workspace.
for name in ("molteniron-nodes.json", "hardware_info", "localrc"):
    os.replace(os.path.join(aside, name), os.path.join(workspace, name))
print(f"molteniron: wrote molteniron-nodes.json, hardware_info and localrc for "
      f"{len(facts)} node(s) in {os.path.abspath(workspace)}", file=sys.stderr)
PYTHON
