"""`molteniron-cleaner`: cleans dirty nodes with the configured cleaning_command.

Loops: claims a dirty node from the worker (clean_claim, admins only), runs
cleaning_command with the node's fields in MOLTENIRON_* environment variables
(split with shlex, never run by a shell, so no value is interpreted), at most
cleaning_timeout seconds (then its whole process group is killed), and reports
back (clean_done): exit 0 -> ready, anything else -> maintenance with the exit
code and the last line of stderr. Several cleaners may run; a cleaner stopped
with SIGTERM or SIGINT kills its command and gives its claim back (clean_abandon);
one that dies leaves a claim that lapses a minute after the worker's
cleaning_timeout. A report the worker refuses as stale (409: an admin forced the
node ready, another cleaner took it over) is logged, and the cleaner carries on.

The command gets a clean environment (command_environment): PATH, the locale and
the node's variables, never the cleaner's own login or anything else it was given.

stdout: one JSON line per node (what was done); stderr: for people.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

from molteniron import __version__, errors, logs, protocol
from molteniron.config import load_config

log = logging.getLogger("molteniron.cleaner")

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 4
# What the command gets: environment variable -> field of the node's blob or record.
NODE_ENV = {
    "MOLTENIRON_NODE_NAME": "name", "MOLTENIRON_IPMI_IP": "ipmi_ip",
    "MOLTENIRON_IPMI_USER": "ipmi_user", "MOLTENIRON_IPMI_PASSWORD": "ipmi_password",
    "MOLTENIRON_PORT_HWADDR": "port_hwaddr", "MOLTENIRON_CPU_ARCH": "cpu_arch",
    "MOLTENIRON_CPUS": "cpus", "MOLTENIRON_RAM_MB": "ram_mb", "MOLTENIRON_DISK_GB": "disk_gb",
    "MOLTENIRON_NODE_POOL": "node_pool", "MOLTENIRON_ALLOCATION_POOL": "allocation_pool",
}
# What the command gets of the cleaner's own environment: where to find programs and
# which language to speak. Nothing else: the cleaner holds an admin's broker login
# (MOLTENIRON_AMQP_PASSWORD, _URL), and whatever a command prints goes to the journal.
# Not HOME: under systemd it is the user's entry in the password database (/nonexistent
# for the kit's user), where a tool that wants a home finds it anyway; a cleaner started
# by hand may carry another user's, whose credentials (~/.netrc, ~/.my.cnf) tools read.
PASSED_ON = ("PATH", "LANG", "LANGUAGE")
PASSED_ON_PREFIX = "LC_"
# PATH when the cleaner has none: systemd's default for services (never os.defpath,
# whose empty entry would search the working directory).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molteniron-cleaner",
        description="Clean dirty nodes of the MoltenIron pool with cleaning_command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-c", "--conf-dir", metavar="DIR", help="read DIR/conf.yaml")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument("--once", action="store_true",
                        help="clean at most one node, then exit (tests, cron)")
    parser.add_argument("--poll", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait when no node is dirty (default 5)")
    parser.add_argument("--name", default=f"{socket.gethostname()}:{os.getpid()}",
                        help="this cleaner's name, shown by status (default HOST:PID)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.conf_dir)
    except errors.ConfigError as exc:
        print(f"molteniron-cleaner: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    # pika's INFO is a line per socket step.
    logs.setup(config, quiet={"pika": logging.WARNING})
    if not config.cleaning_command:
        print("molteniron-cleaner: no cleaning_command in the configuration", file=sys.stderr)
        return EXIT_USAGE
    from molteniron.clients.client import MoltenIronClient  # pika only once the arguments are good
    client = MoltenIronClient(config.amqp_url, config.request_timeout, tls=config)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            try:
                outcome = clean_one(client, args.name, config.cleaning_command,
                                    config.cleaning_timeout)
            except errors.ServiceUnavailable as exc:
                if args.once:
                    return _fail(exc, EXIT_UNAVAILABLE)
                log.warning("event=unavailable message=%r", exc.message)
                outcome = None
            except errors.MoltenIronError as exc:
                return _fail(exc, EXIT_REFUSED)
            if outcome is not None:
                print(json.dumps(outcome), flush=True)
            if args.once:
                if outcome is None:
                    print(json.dumps({"status": 200, "cleaned": None}), flush=True)
                return EXIT_OK
            if outcome is None:
                time.sleep(args.poll)
    except (errors.Interrupted, KeyboardInterrupt):
        print("molteniron-cleaner: interrupted", file=sys.stderr)
        return 130
    finally:
        client.close()


def clean_one(client, cleaner: str, command: str, timeout: float) -> dict | None:
    """Claim a dirty node, clean it, report; what was done (None: nothing was dirty)."""
    claimed = client.call("clean_claim", {"cleaner": cleaner})
    if not claimed.get("claim"):
        return None
    node = next(iter(claimed["nodes"].values()))
    log.info("event=claimed node=%s until=%s", node["name"], claimed["claimed_until"])
    started = time.monotonic()
    env = command_environment(os.environ, node_environment(node))
    try:
        ok, detail = run_command(command, env, timeout)
    except (errors.Interrupted, KeyboardInterrupt):
        give_back(client, node, claimed["claim"])
        raise
    try:
        reply = client.call("clean_done", {"node_id": node["id"], "claim": claimed["claim"],
                                           "ok": ok, "detail": detail})
    except errors.Conflict as exc:  # taken over, forced ready, removed: not this cleaner's
        log.warning("event=stale_claim node=%s message=%r", node["name"], exc.message)
        return {"status": 409, "cleaned": node["name"], "ok": ok, "stale": True,
                "message": exc.message}
    log.info("event=cleaned node=%s ok=%s state=%s seconds=%.1f detail=%r", node["name"], ok,
             reply["state"], time.monotonic() - started, detail)
    return {"status": 200, "cleaned": node["name"], "ok": ok, "state": reply["state"],
            "maintenance_reason": reply.get("maintenance_reason")}


def give_back(client, node: dict, claim: str) -> None:
    """Stopping mid-cleaning: the claim goes back, so the next cleaner need not wait for
    it to lapse (cleaning_timeout and more). Best effort: the claim lapses anyway."""
    try:
        client.call("clean_abandon", {"node_id": node["id"], "claim": claim})
        log.info("event=claim_given_back node=%s", node["name"])
    except errors.MoltenIronError as exc:
        log.warning("event=claim_not_given_back node=%s message=%r", node["name"], exc.message)


def node_environment(node: dict) -> dict[str, str]:
    """The MOLTENIRON_* variables of a claimed node (the original's node shape)."""
    fields = {**json.loads(node["blob"]), **node}
    return {var: str(fields.get(key, "")) for var, key in NODE_ENV.items()}


def command_environment(own: Mapping[str, str], node_env: dict[str, str]) -> dict[str, str]:
    """All the command gets: the cleaner's PATH and locale (PASSED_ON), the node's variables."""
    passed = {name: value for name, value in own.items()
              if name in PASSED_ON or name.startswith(PASSED_ON_PREFIX)}
    return {**passed, "PATH": own.get("PATH") or DEFAULT_PATH, **node_env}


def run_command(command: str, env: dict[str, str], timeout: float) -> tuple[bool, str | None]:
    """Run the command (no shell, only env) at most timeout seconds: (clean?, why not)."""
    try:
        process = subprocess.Popen(
            shlex.split(command), env=env, stdin=subprocess.DEVNULL,
            stdout=sys.stderr, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        return False, f"cannot run cleaning_command: {exc}"
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return False, f"timed out after {timeout:g}s"
    except BaseException:  # interrupted: the command must not go on cleaning unwatched
        _kill_group(process)
        raise
    if process.returncode == 0:
        return True, None
    lines = stderr.decode(errors="replace").strip().splitlines()
    last = f": {lines[-1].strip()}" if lines else ""
    return False, f"exit code {process.returncode}{last}"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the children go too
    except ProcessLookupError:
        pass
    process.communicate()


def _interrupt(signum, frame):
    raise errors.Interrupted()


def _fail(exc: errors.MoltenIronError, code: int) -> int:
    print(json.dumps(protocol.without_envelope(exc.reply or exc.to_reply())))
    print(f"molteniron-cleaner: {exc.message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
