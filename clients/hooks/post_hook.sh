#!/usr/bin/env bash
# Jenkins post-build step (run it always, also on failure/abort): give the nodes back.
#   post_hook.sh        owner: $MOLTENIRON_OWNER, else Jenkins' $BUILD_TAG, as pre_hook.sh
# Safe to run twice, and after a pre-hook that got nothing: an owner that holds no nodes
# ("No nodes are owned", 404) is success. The release also cancels the owner's waiting
# allocates. While RabbitMQ or the worker does not answer (exit 4) it tries again, for
# up to MOLTENIRON_RELEASE_RETRY seconds (default 300). A release that is still queued
# then takes effect when a worker comes: that is a warning and exit 0, not a failed
# build. Anything else fails at once, untried again: 1 refused (e.g. 403, another broker
# user's owner), 2 usage or configuration (the broker refused the login, the vhost or a
# permission, or its certificate is not trusted: trying again cannot help), 4 the broker
# stayed unreachable, 5 the nodes were taken back before this release (the lease
# expired, an admin removed them): the job ran on nodes that may have gone to another
# job meanwhile, so its result cannot be trusted.
set -uo pipefail
owner=${MOLTENIRON_OWNER:-${BUILD_TAG:?set MOLTENIRON_OWNER or run under Jenkins}}
if ! command -v molteniron > /dev/null; then
  echo "molteniron: the molteniron command is not on PATH" >&2
  exit 2
fi
retry_for=${MOLTENIRON_RELEASE_RETRY:-300}
pause=10
give_up_at=$((SECONDS + retry_for))
while true; do
  reply=$(molteniron release "$owner")
  rc=$?
  printf '%s\n' "$reply"
  case $rc in
    0) exit 0 ;;
    # 404 "No nodes are owned": the pre-hook never got nodes, nothing to give back.
    1) [[ $reply == *'"status": 404'* ]] && exit 0; exit 1 ;;
    4) ;;
    5) echo "molteniron: the nodes of $owner were taken back while the job held them" \
            "(see the reply above): failing the build" >&2
       exit 5 ;;
    *) exit $rc ;;
  esac
  left=$((give_up_at - SECONDS))
  [ $left -gt 0 ] || break
  sleep $((left < pause ? left : pause))
done
if [[ $reply == *'"queued": true'* ]]; then
  echo "molteniron: WARNING: no worker answered; the release of $owner is queued and" \
       "gives the nodes back when a worker consumes it" >&2
  exit 0
fi
echo "molteniron: could not release the nodes of $owner within ${retry_for}s" >&2
exit 4
