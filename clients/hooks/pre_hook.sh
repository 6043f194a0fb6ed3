#!/usr/bin/env bash
# Jenkins pre-build step: check out nodes for this build and keep their facts.
#   pre_hook.sh [COUNT] [POOL]  -> writes molteniron-nodes.json in the workspace
# Exits non-zero (and the build fails) when no nodes came within MOLTENIRON_WAIT seconds.
set -euo pipefail
owner=${MOLTENIRON_OWNER:-${BUILD_TAG:?set MOLTENIRON_OWNER or run under Jenkins}}
molteniron allocate "$owner" "${1:-1}" "${2:-default}" --wait "${MOLTENIRON_WAIT:-3600}" \
  > "${WORKSPACE:-.}/molteniron-nodes.json"
