#!/usr/bin/env bash
# Brings a local MoltenIron stack up on this machine: RabbitMQ, MariaDB, the
# project in .venv, the database schema, one worker and the web pages
# (molteniron-web, on WEB_ADDRESS, default 127.0.0.1:8080) in the background, and a
# round trip on demo nodes.
#   bash deploy/local-stack.sh up        everything above (idempotent)
#   bash deploy/local-stack.sh services  only make sure RabbitMQ and MariaDB run
#   bash deploy/local-stack.sh down      stop the background worker and web pages
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.molteniron
VENV=${VENV:-.venv}
export MOLTENIRON_DB_URL=${MOLTENIRON_DB_URL:-mysql+pymysql://root@127.0.0.1:3306/molteniron}
export MOLTENIRON_AMQP_URL=${MOLTENIRON_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}
# A stack for trying things out, with the broker's guest login for everything:
# authorization off on purpose (a worker without `admins` refuses to start).
export MOLTENIRON_ADMINS=${MOLTENIRON_ADMINS:-off}
WEB_ADDRESS=${WEB_ADDRESS:-127.0.0.1:8080}

say() { echo "local-stack: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 120); do port_open "$1" && return 0; sleep 0.5; done
  say "$2 did not open port $1 within 60s"; return 1
}

services() {
  if ! command -v rabbitmq-server >/dev/null || ! command -v mariadbd >/dev/null; then
    say "installing rabbitmq-server and mariadb-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server mariadb-server
  fi
  if ! port_open 3306; then
    say "starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    start-stop-daemon --start --oknodo --background --chuid mysql --exec /usr/sbin/mariadbd
    wait_port 3306 MariaDB
  fi
  if ! port_open 5672; then
    say "starting RabbitMQ"
    rabbitmq-server -detached
    wait_port 5672 RabbitMQ
  fi
  rabbitmqctl await_startup >/dev/null
}

install() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e '.[test]'
}

worker_running() { [ -f "$STATE/worker.pid" ] && kill -0 "$(cat "$STATE/worker.pid")" 2>/dev/null; }

start_worker() {
  mkdir -p "$STATE"
  "$VENV/bin/molteniron-worker" --migrate-only
  if worker_running; then
    say "worker already running (pid $(cat "$STATE/worker.pid"))"
  else
    nohup "$VENV/bin/molteniron-worker" --no-migrate >>"$STATE/worker.log" 2>&1 &
    echo $! >"$STATE/worker.pid"
    say "worker started (pid $!, log $STATE/worker.log)"
  fi
  for _ in $(seq 1 60); do
    "$VENV/bin/molteniron" --timeout 2 status >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  say "the worker does not answer; see $STATE/worker.log"; return 1
}

web_running() { [ -f "$STATE/web.pid" ] && kill -0 "$(cat "$STATE/web.pid")" 2>/dev/null; }

start_web() {
  if web_running; then
    say "web pages already running (pid $(cat "$STATE/web.pid"))"
  else
    nohup "$VENV/bin/molteniron-web" --address "$WEB_ADDRESS" >>"$STATE/web.log" 2>&1 &
    echo $! >"$STATE/web.pid"
  fi
  for _ in $(seq 1 60); do
    if port_open "${WEB_ADDRESS##*:}"; then
      say "web pages: http://$WEB_ADDRESS/ (pid $(cat "$STATE/web.pid"), log $STATE/web.log)"
      return 0
    fi
    web_running || break
    sleep 0.5
  done
  say "the web pages do not answer; see $STATE/web.log"; return 1
}

demo() {
  local mi="$VENV/bin/molteniron"
  for i in 1 2 3; do
    "$mi" add_baremetal "demo-$i" "10.0.9.$i" admin "demo-secret-$i" "10.0.10.${i}1,10.0.10.${i}2" \
      "52:54:00:00:09:0$i" x86_64 8 16384 200 demo >/dev/null 2>&1 || true  # already there
  done
  echo "\$ molteniron allocate demo-job 2 demo"
  "$mi" allocate demo-job 2 demo
  echo "\$ molteniron release demo-job"
  "$mi" release demo-job
  echo "\$ molteniron status --pool demo"
  "$mi" -o result status --pool demo
}

case "${1:-up}" in
  services) services ;;
  up) services; install; start_worker; demo; start_web
      say "up: run '. $VENV/bin/activate' to get molteniron on PATH; the pool's pages: http://$WEB_ADDRESS/" ;;
  down)
    if web_running; then kill "$(cat "$STATE/web.pid")"; say "web pages stopped"; fi
    rm -f "$STATE/web.pid"
    if worker_running; then kill "$(cat "$STATE/worker.pid")"; say "worker stopped"; fi
    rm -f "$STATE/worker.pid" ;;
  *) echo "usage: $0 [up|services|down]" >&2; exit 2 ;;
esac
