#!/usr/bin/env bash
# Jenkins post-build step (run it always, also on failure/abort): give the nodes back.
set -uo pipefail
owner=${MOLTENIRON_OWNER:-${BUILD_TAG:?set MOLTENIRON_OWNER or run under Jenkins}}
molteniron release "$owner"
rc=$?
# 1 with "No nodes are owned" means the pre-hook never got nodes: nothing to give back.
[ $rc -eq 0 ] || [ $rc -eq 1 ] || exit $rc
