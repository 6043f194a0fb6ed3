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
# Files of an earlier build are removed first, so a build that got no nodes has none.
#
# Owner: $MOLTENIRON_OWNER, else Jenkins' $BUILD_TAG (post_hook.sh uses the same).
# MOLTENIRON_WAIT: longest wait for nodes (default 3600 s); MOLTENIRON_LEASE: how long
# the nodes stay this build's (default: the worker's lease_seconds). When each lease
# ends is printed on stderr.
# Exit codes are molteniron's: 0 nodes written; 1 refused (e.g. the pool is too small);
# 2 usage or configuration; 3 no nodes came within MOLTENIRON_WAIT; 4 no broker or no
# worker answered; 130 interrupted (the waiting allocate is cancelled first).
set -euo pipefail
owner=${MOLTENIRON_OWNER:-${BUILD_TAG:?set MOLTENIRON_OWNER or run under Jenkins}}
workspace=${WORKSPACE:-.}
nodes_file="$workspace/molteniron-nodes.json"
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
# nodes this build does not hold.
rm -f "$nodes_file" "$workspace/hardware_info" "$workspace/localrc"
molteniron allocate "$owner" "${1:-1}" "${2:-default}" --wait "${MOLTENIRON_WAIT:-3600}" \
  ${MOLTENIRON_LEASE:+--lease "$MOLTENIRON_LEASE"} > "$nodes_file"

"$python" - "$nodes_file" "$workspace" "$owner" <<'PYTHON'
import json
import os
import re
import shlex
import sys

nodes_file, workspace, owner = sys.argv[1:]
with open(nodes_file) as f:
    nodes = sorted(json.load(f)["nodes"].values(), key=lambda node: node["id"])
facts = [{**json.loads(node["blob"]), **node,
          "ips": [ip for ip in node["allocation_pool"].split(",") if ip]} for node in nodes]


def warn(message):
    print(f"molteniron: WARNING: {message}", file=sys.stderr)


def write(name, lines):
    fd = os.open(os.path.join(workspace, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
print(f"molteniron: wrote molteniron-nodes.json, hardware_info and localrc for "
      f"{len(facts)} node(s) in {os.path.abspath(workspace)}", file=sys.stderr)
PYTHON
