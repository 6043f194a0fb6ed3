#!/usr/bin/env bash
# Jenkins pre-build step: check out nodes for this build and keep their facts.
#   pre_hook.sh [COUNT] [POOL]  -> writes molteniron-nodes.json in the workspace
# The file holds IPMI passwords: it is made readable by this user only (mode 600).
# MOLTENIRON_WAIT: longest wait for nodes (default 3600 s); MOLTENIRON_LEASE: how long
# the nodes stay this build's (default: the worker's lease_seconds). When each lease
# ends is printed on stderr.
# Exits non-zero (and the build fails) when no nodes came within MOLTENIRON_WAIT seconds.
set -euo pipefail
owner=${MOLTENIRON_OWNER:-${BUILD_TAG:?set MOLTENIRON_OWNER or run under Jenkins}}
nodes_file="${WORKSPACE:-.}/molteniron-nodes.json"
umask 077
rm -f "$nodes_file"  # an old file keeps its old mode when it is overwritten
molteniron allocate "$owner" "${1:-1}" "${2:-default}" --wait "${MOLTENIRON_WAIT:-3600}" \
  ${MOLTENIRON_LEASE:+--lease "$MOLTENIRON_LEASE"} > "$nodes_file"

if command -v jq > /dev/null; then
  leases=$(jq -r '.nodes[] | "\(.name) \(.lease_expires_at // "unknown")"' "$nodes_file")
else
  leases=$(python3 -c 'import json, sys
for node in json.load(open(sys.argv[1]))["nodes"].values():
    print(node["name"], node.get("lease_expires_at") or "unknown")' "$nodes_file")
fi
while read -r name until; do
  echo "molteniron: $name is leased to $owner until $until (molteniron renew $owner to extend)" >&2
done <<< "$leases"
