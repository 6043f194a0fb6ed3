#!/usr/bin/env bash
# A CI job as one shell script: nodes from MoltenIron, the job's own step, nodes back.
#   pipeline.sh JOB_COMMAND [ARG...]
# e.g. MOLTENIRON_COUNT=2 pipeline.sh ./run-devstack.sh
#
# The job step runs in $WORKSPACE (else the current directory) and finds there what
# pre_hook.sh wrote: molteniron-nodes.json, hardware_info and localrc (mode 600). While
# it runs, keep_lease.sh renews the nodes' lease (every third of MOLTENIRON_LEASE), so a
# long job keeps its nodes; if they are taken back all the same, the step is stopped and
# the build fails (exit 5). The
# release runs on every way out: the job step's success or failure, a pre-hook that got
# no nodes, Ctrl-C, SIGTERM (a CI system aborting the build). Only SIGKILL skips it; the
# lease gives the nodes back then. A signal to this script alone (kill PID, as well as
# one to its whole process group) acts at once: the step that runs is stopped first (a
# waiting allocate is cancelled, the job step gets SIGTERM), then the release runs.
#
# MOLTENIRON_HOOKS   folder of pre_hook.sh and post_hook.sh (default: this checkout's
#                    clients/hooks)
# MOLTENIRON_OWNER   owner of the nodes (default: $BUILD_TAG, else host-pid-time)
# MOLTENIRON_COUNT, MOLTENIRON_POOL   how many nodes, of which pool (default 1, default)
# and what the hooks read: MOLTENIRON_WAIT, MOLTENIRON_LEASE, MOLTENIRON_RELEASE_RETRY,
# MOLTENIRON_AMQP_URL, MOLTENIRON_AMQP_PASSWORD, MOLTENIRON_CONFIG.
# Exit code: the job step's; else the pre-hook's (3: no nodes in time); else the
# post-hook's (a release that fails makes a passing job fail; 5: the nodes were taken
# back under the job).
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 JOB_COMMAND [ARG...]" >&2; exit 2; }
hooks=${MOLTENIRON_HOOKS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../clients/hooks" && pwd)}
export MOLTENIRON_OWNER=${MOLTENIRON_OWNER:-${BUILD_TAG:-$(hostname)-$$-$(date +%s)}}
export WORKSPACE=${WORKSPACE:-$PWD}

release() {
  local status=$?
  trap - EXIT INT TERM
  bash "$hooks/post_hook.sh" || { local failed=$?; [ "$status" -ne 0 ] || status=$failed; }
  exit "$status"
}
# SIGTERM/SIGINT: the running step gets SIGTERM (a background one ignores SIGINT) and is
# waited for, so that the pre-hook's cancel is done before the post-hook runs.
stop() {
  trap '' INT TERM
  local running
  running=$(jobs -p)
  if [ -n "$running" ]; then
    kill -TERM $running 2> /dev/null || true
    wait $running || true
  fi
  exit "$1"
}
trap release EXIT
trap 'stop 130' INT
trap 'stop 143' TERM

# Each step runs in the background and is waited for: bash runs a trap only between
# commands, so a step in the foreground would hold a signal to this script until the
# step ended (a waiting allocate: up to MOLTENIRON_WAIT).
step() {
  "$@" &
  wait $!
}

step bash "$hooks/pre_hook.sh" "${MOLTENIRON_COUNT:-1}" "${MOLTENIRON_POOL:-default}"
cd "$WORKSPACE"
step bash "$hooks/keep_lease.sh" "$@"
