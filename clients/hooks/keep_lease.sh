#!/usr/bin/env bash
# Run the job's own step while its nodes' lease is renewed: a running job keeps its nodes.
#   keep_lease.sh JOB_COMMAND [ARG...]
# Between pre_hook.sh and post_hook.sh, e.g. keep_lease.sh ./stack.sh. Every
# MOLTENIRON_RENEW_EVERY seconds (default: a third of MOLTENIRON_LEASE, else of the
# worker's default lease of 21600 s) it runs `molteniron renew OWNER`, asking for
# MOLTENIRON_LEASE seconds again when set. Renewing stops when the job step ends.
# If the nodes were taken back all the same (renew exits 5: the lease had already
# expired, an admin removed them) the job step is stopped (SIGTERM): the nodes may be
# another job's now. A renew that fails otherwise (no broker for a while) is retried at
# the next turn; it is only a warning.
# Owner: $MOLTENIRON_OWNER, else Jenkins' $BUILD_TAG, as the other hooks.
# Exit code: the job step's; 5 when the nodes were taken back under it.
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: $0 JOB_COMMAND [ARG...]" >&2; exit 2; }
owner=${MOLTENIRON_OWNER:-${BUILD_TAG:?set MOLTENIRON_OWNER or run under Jenkins}}
lease=${MOLTENIRON_LEASE:-}
every=${MOLTENIRON_RENEW_EVERY:-$(( ${lease:-21600} / 3 ))}
[ "$every" -ge 1 ] 2>/dev/null || every=1
marker=$(mktemp)
trap 'rm -f "$marker"' EXIT

"$@" &
step=$!
# The renewer's sleep keeps none of the build's output open, and is killed and reaped
# with the renewer: Jenkins waits for every process holding the step's output. KILL, as
# a TERM that reaches a child between bash's fork and its exec of sleep is lost.
(
  trap 'kill -KILL $(jobs -p) 2>/dev/null; wait; exit 0' TERM
  while true; do
    sleep "$every" < /dev/null > /dev/null 2>&1 &
    wait $!
    kill -0 "$step" 2>/dev/null || exit 0
    molteniron renew "$owner" ${lease:+--lease "$lease"} > /dev/null
    case $? in
      0) ;;
      5) echo "molteniron: the nodes of $owner were taken back while the job ran;" \
              "stopping the job step" >&2
         echo taken_back > "$marker"
         kill -TERM "$step" 2>/dev/null
         exit 0 ;;
      *) echo "molteniron: WARNING: could not renew the lease of $owner; trying again" \
              "in ${every}s" >&2 ;;
    esac
  done
) &
renewer=$!
# SIGTERM/SIGINT to this script (a CI aborting the build) reach the job step too.
trap 'kill -TERM "$step" 2>/dev/null' TERM INT
status=0
while true; do
  wait "$step"
  status=$?
  kill -0 "$step" 2>/dev/null || break  # wait returned for a trapped signal: wait again
done
kill "$renewer" 2>/dev/null
wait "$renewer" 2>/dev/null
[ -s "$marker" ] && exit 5
exit "$status"
