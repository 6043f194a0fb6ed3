#!/usr/bin/env bash
# Installs MoltenIron as a service on Debian 12 (or any systemd Linux with python3-venv):
#   deploy/install.sh [--root DIR] [--python PY] [--web] [SOURCE] [-- PIP_OPTION...]
# SOURCE: a source tree, a wheel, or anything pip takes (default: the tree this
# script is in). PIP_OPTIONs go to pip, e.g. `-- --no-index --find-links /srv/wheels`.
# --python PY: the interpreter the venv is made with (default: python3 on PATH). The
# venv links to it rather than copying it, so the services' users must be able to run
# it: install.sh refuses one they cannot (with --root: one other users cannot), such
# as pyenv's under /root (mode 700). Then give the system's: --python /usr/bin/python3.
# (Once the venv exists, its interpreter is the one checked: remove the venv to change it.)
#
# What goes where (README "Deploying"):
#   /opt/molteniron                 a venv holding MoltenIron and its dependencies
#                                   (Debian's system pip is blocked: PEP 668)
#   /usr/local/bin/molteniron, molteniron-worker, molteniron-cleaner, molteniron-web
#                                   links into it
#   /usr/local/share/bash-completion/completions/molteniron
#                                   bash completion (`molteniron completion bash`), replaced
#   /opt/molteniron/hooks/          the Jenkins hooks of the installed package (pre_hook.sh,
#                                   post_hook.sh, keep_lease.sh; MOLTENIRON_HOOKS), replaced
#   /etc/molteniron/                root:root 755: every user may enter; each file's own
#                                   mode says who reads it
#   /etc/molteniron/client.yaml     root:root 644, written once: what the `molteniron` CLI
#                                   reads first, for CI agents and people: the CI broker
#                                   user (molteniron-ci), request_timeout, allocate_wait.
#                                   No password, nothing of the worker's: a job gives the
#                                   CI user's password in MOLTENIRON_AMQP_PASSWORD (a
#                                   Jenkins credential). Point its URL at your broker
#   /etc/molteniron/conf.yaml       root:molteniron 640, written once: the kit's users,
#                                   vhost and database on 127.0.0.1; edit it. No
#                                   password: worker, cleaner and web pages read it
#   /etc/molteniron/conf.yaml.example   every key with its default (replaced each time)
#   /etc/molteniron/environment     root:root 600, the worker's secrets:
#                                   MOLTENIRON_DB_PASSWORD, MOLTENIRON_AMQP_PASSWORD
#   /etc/molteniron/cleaner.environment  root:root 600, the cleaner's broker login
#                                   (molteniron-admin): MOLTENIRON_AMQP_URL, _PASSWORD
#   /etc/molteniron/secret.keys     molteniron:molteniron 600, the Fernet key that
#                                   encrypts IPMI passwords in the database
#   /etc/molteniron/web.environment root:root 600, only with --web: the web pages'
#                                   broker login (molteniron-web): MOLTENIRON_AMQP_URL, _PASSWORD
#   /etc/systemd/system/molteniron-worker.service, molteniron-cleaner.service,
#                      molteniron-web.service (installed, left disabled)
# and three system users (no login shell, no home): molteniron runs the worker,
# molteniron-cleaner the cleaner and so its cleaning_command, molteniron-web the web
# pages (which read conf.yaml and nothing else of the kit). Neither can read the
# other's secrets: systemd (root) reads the environment files for them (EnvironmentFile=),
# only the worker reads secret.keys, and one user cannot read the other's processes
# (/proc/PID/environ). The cleaner's and web pages' units add the group molteniron
# (SupplementaryGroups=) so they can read conf.yaml; no secret is readable by a group.
# Any other user (a Jenkins agent's) reads client.yaml and nothing else of the kit.
#
# Idempotent: run it again to upgrade. The venv is upgraded in place, the hooks and
# units replaced (local changes belong in `systemctl edit` drop-ins); what client.yaml,
# conf.yaml, the environment files and secret.keys hold is never touched once they exist, but their
# owners and modes are set again on every run (so an upgrade from a kit whose worker
# and cleaner shared a user takes the cleaner's access away). Passwords are generated
# on the first run: give the broker and database users the same ones (README
# "Deploying"), or put yours in the files.
#
# --root DIR: install under DIR instead of / (a trial run; the tests). No user is
# made and nothing is chowned (the modes are set); the owners a real install would
# set are only said, one line per file: "install.sh: PATH OWNER:GROUP MODE (not
# chowned: --root)". The venv is made in place, so its scripts, the links and the
# paths in conf.yaml point into DIR. Only a run as root without --root creates the
# users, sets owners and reloads systemd.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=""
python=python3
named="python3 on PATH"  # how the refusal below names the interpreter
source=""
pip_options=()
web=false
usage() { echo "usage: $0 [--root DIR] [--python PY] [--web] [SOURCE] [-- PIP_OPTION...]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || usage; root=$(realpath -m "$2"); shift 2 ;;
    --python) [ $# -ge 2 ] || usage; python=$2; named="--python $2"; shift 2 ;;
    --web) web=true; shift ;;
    --) shift; pip_options=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$source" ] || usage; source=$1; shift ;;
  esac
done
if [ -z "$source" ]; then
  [ -f "$here/../pyproject.toml" ] || { echo "install.sh: give SOURCE (a tree or a wheel)" >&2; usage; }
  source=$(cd "$here/.." && pwd)
fi
[ -e "$source" ] && source=$(realpath "$source")  # else a requirement such as molteniron==2.0
for file in conf.yaml.example molteniron-worker.service molteniron-cleaner.service \
    molteniron-web.service; do
  [ -f "$here/$file" ] || { echo "install.sh: $here/$file is missing" >&2; exit 2; }
done

real=false
if [ -z "$root" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (or --root DIR for a trial)" >&2; exit 2; }
  real=true
fi
venv=$root/opt/molteniron
etc=$root/etc/molteniron
bin=$root/usr/local/bin
units=$root/etc/systemd/system
say() { echo "install.sh: $*" >&2; }

# The owner and mode of a file of the kit, set on every run; said either way, so a
# --root trial shows what a real install would set.
own() {  # PATH MODE OWNER:GROUP
  local path=$1 mode=$2 owner=$3
  chmod "$mode" "$path"
  if $real; then
    chown "$owner" "$path"
    say "$path $owner $mode"
  else
    say "$path $owner $mode (not chowned: --root)"
  fi
}

# A file written only when absent (never overwrites an operator's edits or secrets),
# then given its owner and mode (again on every run).
write_once() {  # PATH MODE OWNER:GROUP, content on stdin
  local path=$1
  if [ -e "$path" ]; then
    cat >/dev/null
    say "kept $path"
  else
    (umask 077; cat >"$path.new")  # root's alone until own() below
    mv "$path.new" "$path"
    say "wrote $path"
  fi
  own "$@"
}

# The worker's and the cleaner's users: two, so that cleaning_command (run by the
# cleaner, as its user) cannot read the worker's secrets or its processes.
system_user() {  # NAME COMMENT
  if $real && ! getent passwd "$1" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin --comment "$2" "$1"
    say "created system user $1"
  fi
}
system_user molteniron "MoltenIron worker"
system_user molteniron-cleaner "MoltenIron cleaner"
system_user molteniron-web "MoltenIron web pages"

# The venv's python is a link to the interpreter it was made with: the services' users
# must be able to run that one (pyenv's python3 under /root, mode 700, they cannot).
checked=$python
[ -x "$venv/bin/python" ] && checked=$venv/bin/python
if ! interpreter=$("$checked" -I -c 'import os, sys; print(os.path.realpath(sys._base_executable))' \
    2>/dev/null); then
  say "cannot run $checked: give an interpreter with --python PY, e.g. --python /usr/bin/python3"
  exit 2
fi
refuse_interpreter() {  # WHO [WHY]
  local way="--python PY naming one $1 can run, e.g. --python /usr/bin/python3"
  [ -x /usr/bin/python3 ] || way="--python PY naming one $1 can run"
  if [ "$checked" = "$venv/bin/python" ]; then
    say "$1 cannot run $interpreter${2:+ ($2)}, the interpreter of the venv $venv:" \
      "remove $venv and run install.sh again with $way"
  else
    say "$1 cannot run $interpreter${2:+ ($2)}, the interpreter of $named" \
      "($(command -v "$python")), which the venv would link to: give $way"
  fi
  exit 2
}
if $real; then
  runuser -u molteniron -- "$interpreter" -I -c '' >/dev/null 2>&1 ||
    refuse_interpreter "the service user molteniron"
else
  # No service user under --root: the interpreter and its standard library must be
  # open to other users, as a real install's users would need.
  closed=$("$checked" -I -c '
import os, stat, sys, sysconfig
for target, bit in ((sys._base_executable, stat.S_IXOTH),
                    (os.path.join(sysconfig.get_path("stdlib"), "os.py"), stat.S_IROTH)):
    path = os.path.realpath(target)
    parts = path.split(os.sep)
    for where, needed in [(os.sep.join(parts[:i]) or os.sep, stat.S_IXOTH)
                          for i in range(1, len(parts))] + [(path, bit)]:
        mode = stat.S_IMODE(os.stat(where).st_mode)
        if not mode & needed:
            print(f"{where} is mode {mode:o}")
            sys.exit()')
  [ -z "$closed" ] || refuse_interpreter "another user" "$closed"
fi

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    say "$python cannot make a venv: apt-get install python3-venv"; exit 2
  fi
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  say "made the venv $venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "${pip_options[@]}" "$source"
say "installed $("$venv/bin/pip" show molteniron 2>/dev/null | sed -n 's/^Version: //p') into $venv"

mkdir -p "$bin"
for command in molteniron molteniron-worker molteniron-cleaner molteniron-web; do
  ln -sfn "$venv/bin/$command" "$bin/$command"
done

# Bash completion, made once by the installed CLI from its own parser; bash-completion
# loads it on the first TAB after `molteniron`, so no shell and no run of the CLI pays
# for it.
completions=$root/usr/local/share/bash-completion/completions
install -d -m 755 "$completions"
"$venv/bin/molteniron" completion bash >"$completions/molteniron.new"
mv "$completions/molteniron.new" "$completions/molteniron"
chmod 644 "$completions/molteniron"
say "wrote $completions/molteniron (bash completion)"

# The Jenkins hooks (examples/jenkins use them from here: MOLTENIRON_HOOKS), as the
# installed package ships them: a wheel install gets them too.
hooks=$("$venv/bin/python" -I -c \
  'import molteniron.clients as c, os; print(os.path.join(os.path.dirname(c.__file__), "hooks"))')
shipped=("$hooks"/*.sh)
[ -f "${shipped[0]}" ] || { say "the installed package has no hooks in $hooks"; exit 2; }
install -d -m 755 "$venv/hooks"
install -m 755 "${shipped[@]}" "$venv/hooks/"
say "installed the Jenkins hooks into $venv/hooks"

mkdir -p "$etc"
# Every user may enter, for client.yaml; each file's mode guards it: conf.yaml is the group
# molteniron's (the cleaner and web pages join it by SupplementaryGroups=), the secrets
# root's or the worker's alone.
own "$etc" 755 root:root
install -m 644 "$here/conf.yaml.example" "$etc/conf.yaml.example"
new_secret() { "$venv/bin/python" -I -c 'import secrets; print(secrets.token_hex(24))'; }

write_once "$etc/conf.yaml" 640 root:molteniron <<EOF
# Written by deploy/install.sh; every key with its default and what it does:
# $etc/conf.yaml.example. The passwords are not here: the worker reads them from
# $etc/environment, the cleaner from $etc/cleaner.environment. Keep them out:
# both the worker's and the cleaner's users read this file.
# These are the users, vhost and database of deploy/rabbitmq-definitions.json and
# deploy/create-database.sql; point the URLs at your broker and database.
db_url: mysql+pymysql://molteniron@127.0.0.1:3306/molteniron
amqp_url: amqp://molteniron-worker@127.0.0.1:5672/molteniron
admins: [molteniron-admin]
secret_key_file: $etc/secret.keys
# cleaning_command: /usr/local/bin/check-node --power-off   (then enable molteniron-cleaner)
EOF

# The `molteniron` CLI reads this before conf.yaml (molteniron/config.py): CI agents that
# are not root, and must not read the services' files, read it.
write_once "$etc/client.yaml" 644 root:root <<EOF
# Written by deploy/install.sh: what the \`molteniron\` CLI reads first (before
# conf.yaml), for CI agents and people. Every user of this machine may read it: no
# password here, nor anything of the worker's. A job gives the CI user's password in
# MOLTENIRON_AMQP_PASSWORD (Jenkins: a secret text credential). Point the URL at your
# broker; every key with its default: $etc/conf.yaml.example (amqp_ca_file for amqps://).
# The user deploy/rabbitmq-definitions.json makes for CI jobs:
amqp_url: amqp://molteniron-ci@127.0.0.1:5672/molteniron
# Seconds the CLI waits for a worker's answer, and an allocate for nodes (unless --wait):
request_timeout: 30
allocate_wait: 3600
EOF

# The environment files are read by systemd (root) for EnvironmentFile=: neither
# service's user needs to read one, so neither can read the other's.
write_once "$etc/environment" 600 root:root <<EOF
# The worker's secrets (EnvironmentFile= of molteniron-worker.service).
# Generated by install.sh: give the users these passwords (README "Deploying").
# MariaDB user molteniron:
MOLTENIRON_DB_PASSWORD=$(new_secret)
# RabbitMQ user molteniron-worker:
MOLTENIRON_AMQP_PASSWORD=$(new_secret)
EOF

write_once "$etc/cleaner.environment" 600 root:root <<EOF
# The cleaner's broker login (EnvironmentFile= of molteniron-cleaner.service): an
# admin, since a claim carries the node's IPMI password. It replaces amqp_url of
# conf.yaml: name the same broker (a cluster's nodes: comma-separated, in order).
MOLTENIRON_AMQP_URL=amqp://molteniron-admin@127.0.0.1:5672/molteniron
# RabbitMQ user molteniron-admin (generated by install.sh):
MOLTENIRON_AMQP_PASSWORD=$(new_secret)
EOF

# --web: the web pages' broker login, a user of its own with a CI user's rights (it sends
# only read-only operations). Without --web nothing is written: the unit, left
# disabled, would not start without this file.
if $web; then
  write_once "$etc/web.environment" 600 root:root <<EOF
# molteniron-web's broker login (EnvironmentFile= of molteniron-web.service). It
# replaces amqp_url of conf.yaml: name the same broker (a cluster's nodes: comma-separated).
MOLTENIRON_AMQP_URL=amqp://molteniron-web@127.0.0.1:5672/molteniron
# RabbitMQ user molteniron-web (generated by install.sh):
MOLTENIRON_AMQP_PASSWORD=$(new_secret)
EOF
fi

# A Fernet key: 32 random bytes, urlsafe base64 (what molteniron-worker
# --generate-secret-key prints). Back it up with the database: without it the
# stored IPMI passwords cannot be read.
write_once "$etc/secret.keys" 600 molteniron:molteniron < <(
  "$venv/bin/python" -I -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')

# conf.yaml is readable by the group molteniron, the cleaner's user included, and
# client.yaml by everyone: a password belongs in the environment files (the worker's or
# the cleaner's) or a job's environment, never in a URL here.
has_password() { grep -v '^[[:space:]]*#' "$1" | grep -Eq '://[^/@[:space:]]*:[^/@[:space:]]*@'; }
if has_password "$etc/conf.yaml"; then
  say "WARNING: $etc/conf.yaml holds a password in a URL, and the cleaner's user can" \
    "read it: move it to $etc/environment (MOLTENIRON_DB_PASSWORD, MOLTENIRON_AMQP_PASSWORD)"
fi
if has_password "$etc/client.yaml"; then
  say "WARNING: $etc/client.yaml holds a password in a URL, and every user of this" \
    "machine can read it: remove it; jobs give it in MOLTENIRON_AMQP_PASSWORD"
fi

mkdir -p "$units"
for unit in molteniron-worker.service molteniron-cleaner.service molteniron-web.service; do
  install -m 644 "$here/$unit" "$units/$unit"
done
if $real && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

cat >&2 <<EOF
install.sh: done. Next (README "Deploying"): load deploy/rabbitmq-definitions.json and
  deploy/create-database.sql, give the users the passwords of $etc/environment and
  $etc/cleaner.environment, then: systemctl enable --now molteniron-worker
  CI agents: amqp_url of $etc/client.yaml names the broker; give molteniron-ci a password
  (rabbitmqctl change_password molteniron-ci) that jobs pass in MOLTENIRON_AMQP_PASSWORD
EOF
if $web; then
  echo "install.sh: the web pages: rabbitmqctl change_password molteniron-web with the" \
    "password of $etc/web.environment, then: systemctl enable --now molteniron-web" >&2
fi
