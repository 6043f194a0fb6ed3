"""`molteniron`: the command line. A thin argparse layer over MoltenIronClient.

stdout carries the result (the original's JSON, or a table); stderr is for people.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time

from molteniron import __version__, errors, protocol
from molteniron.config import load_config

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_DEADLINE, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4
EXIT_TAKEN_BACK = 5  # release/renew: the owner's nodes were taken back (lease, admin)
EXIT_INTERRUPTED = 130
# Commands whose result is a table: printed as one when stdout is a terminal.
TABLE_COMMANDS = ("status", "status_baremetal", "waiting", "history", "dead-letters")
EPILOG = """\
exit codes:
  0  success
  1  request refused by the worker (JSON reply on stdout, message on stderr)
  2  usage error or bad configuration, also as the broker finds it: it refused
     the login, the vhost or a permission, or its TLS certificate is not
     trusted (at once, naming which; trying again cannot help)
  3  allocate: the deadline (--wait) passed without nodes
  4  RabbitMQ unreachable within --timeout, or no worker answered: at once when
     no worker consumes the request queue, else after --timeout (an allocate
     is then not sent, or cancelled; a release or cancel stays queued, prints
     {"status": 202, "queued": true, ...} and takes effect when a worker comes)
  5  release/renew: the owner's nodes were taken back before it released them
     (its lease expired, an admin removed them): the job ran on nodes that may
     have gone to another job; fail it (status 410, NodesTakenBack)
  130 interrupted (Ctrl-C/SIGTERM); a waiting allocate is cancelled first

configuration: --config FILE, -c DIR (DIR/conf.yaml), $MOLTENIRON_CONFIG, else
/etc/molteniron/client.yaml (install.sh writes it for CI agents: every user may
read it, it holds no secret), else /etc/molteniron/conf.yaml. $MOLTENIRON_AMQP_URL
overrides amqp_url and $MOLTENIRON_AMQP_PASSWORD gives its password; when the
former is set, a file found there that this user may not read is skipped (with a
warning). amqp_url may list a cluster's brokers (comma-separated): a request in
flight when its broker dies is sent again to the next one.
"""


class _Formatter(argparse.HelpFormatter):
    """argparse makes a formatter for every add_argument, to check its metavar. The
    stock one imports shutil (bz2 and lzma with it) to ask the terminal's width, about
    3 ms of every command: this one asks the terminal directly, as shutil would."""

    def __init__(self, prog: str):
        super().__init__(prog, width=_terminal_columns() - 2)


class _EpilogFormatter(argparse.RawDescriptionHelpFormatter, _Formatter):
    """Keeps the line breaks of the top-level description and epilog."""


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: its help formatted by _Formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


@functools.cache  # asked once: argparse makes a formatter for every add_argument
def _terminal_columns() -> int:
    """$COLUMNS, else the terminal's width, else 80 (shutil.get_terminal_size's rules)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__  # None when Python started without one
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molteniron", epilog=EPILOG, formatter_class=_EpilogFormatter,
        description="Check bare-metal nodes out of the MoltenIron pool and back in.\n\n"
                    "The global options may also follow the command (molteniron status "
                    "--timeout 3).\nTimes are printed in ISO 8601, in UTC with its offset "
                    "(2024-03-04T11:00:00+00:00).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-c", "--conf-dir", metavar="DIR", help="read DIR/conf.yaml")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument("-o", "--output", choices=("json", "result"),
                        help="json: the whole reply (default); result: only its result "
                             "(default for tables when stdout is a terminal)")
    parser.add_argument("--timeout", type=_positive, metavar="SECONDS",
                        help="how long to wait for the worker to answer (default from config, 30)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_CommandParser)

    p = sub.add_parser("add_baremetal", help="add a node from its fields")
    for name in ("name", "ipmi_ip", "ipmi_user", "ipmi_password"):
        p.add_argument(name)
    p.add_argument("allocation_pool", help="comma-separated IPs the node's job may use")
    p.add_argument("port_hwaddr")
    p.add_argument("cpu_arch")
    for name in ("cpus", "ram_mb", "disk_gb"):
        p.add_argument(name, type=int)
    p.add_argument("node_pool", nargs="?", default="default")
    _tags_option(p)

    p = sub.add_parser("add_keyvalue_pairs", help="add a node from KEY=VALUE words")
    p.add_argument("name")
    p.add_argument("ipmi_ip")
    p.add_argument("allocation_pool")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE",
                   help="hardware fields (ipmi_user=..., cpus=8, node_pool=...); "
                        "JSON values allowed")
    _tags_option(p)

    p = sub.add_parser("add_json_blob", help="add a node from a JSON object of hardware fields")
    p.add_argument("name")
    p.add_argument("ipmi_ip")
    p.add_argument("allocation_pool")
    p.add_argument("blob")
    p.add_argument("node_pool", nargs="?", default="default")
    _tags_option(p)

    p = sub.add_parser("allocate", help="check out N nodes for OWNER (waits until they are free)")
    p.add_argument("owner_name")
    p.add_argument("number_of_nodes", type=_positive_int)
    p.add_argument("node_pool", nargs="?", default="default")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--wait", type=_positive, metavar="SECONDS",
                       help="longest wait for nodes (default allocate_wait from config, 3600)")
    group.add_argument("--no-wait", action="store_true",
                       help="fail at once if not enough nodes are ready")
    p.add_argument("--arch", help="only nodes of this cpu_arch")
    for option, what in (("--min-cpus", "CPUs"), ("--min-ram-mb", "MB of RAM"),
                         ("--min-disk-gb", "GB of disk")):
        p.add_argument(option, type=_non_negative_int, metavar="N",
                       help=f"only nodes with at least N {what}")
    p.add_argument("--tag", action="append", dest="tags", metavar="TAG",
                   help="only nodes with this tag (repeat for several)")
    p.add_argument("--priority", type=int, metavar="N",
                   help="higher is served first (default 0); waiting raises it by "
                        "priority_aging per minute")
    p.add_argument("--lease", type=_positive_int, metavar="SECONDS",
                   help="how long the nodes stay yours unless renewed "
                        "(default: the worker's lease_seconds)")

    p = sub.add_parser("renew", help="extend the lease of every node OWNER holds")
    p.add_argument("owner_name")
    p.add_argument("--lease", type=_positive_int, metavar="SECONDS",
                   help="the new lease, from now (default: the worker's lease_seconds)")

    p = sub.add_parser("release",
                       help="return every node of OWNER (and cancel its waiting allocates)")
    p.add_argument("owner_name")

    p = sub.add_parser("get_field", help="a field of every node OWNER holds")
    p.add_argument("owner_name")
    p.add_argument("field_name")

    p = sub.add_parser("set_field", help="set a field of node ID")
    p.add_argument("id", type=int)
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("type", nargs="?", default="string", help="string (default) or int")
    p.add_argument("--force", action="store_true",
                   help="status ready for a node a cleaner is cleaning: drop its claim "
                        "(otherwise refused with 409 until the cleaner reports)")

    for name, what in (("status", "the pool"), ("status_baremetal", "the pool's hardware")):
        p = sub.add_parser(name, help=f"a table of {what}", description=STATUS_COLUMNS_HELP)
        _table_option(p, "human", "the nodes, each field named as its column is (status, "
                                  "provisioned, lease_ends), with the fields the table leaves "
                                  "out (allocated_at, allocation_pool, ...)")
        p.add_argument("--pool", metavar="POOL", help="only this node pool")
        p.add_argument("--state", choices=protocol.NODE_STATES,
                       help="only nodes in this state (column status)")
        p.add_argument("--owner", metavar="OWNER",
                       help="only nodes OWNER holds (column provisioned)")
        p.add_argument("--show-secrets", action="store_true", help="print IPMI passwords")

    p = sub.add_parser("waiting", help="waiting allocations, in the order they will be served")
    p.add_argument("--pool", metavar="POOL", help="only this node pool")
    _table_option(p)

    sub.add_parser("workers",
                   help="running workers (active, standby), waiting allocates, queue depth")

    p = sub.add_parser("cancel", help="cancel a request by id (waiting, served or not yet seen)")
    p.add_argument("request_id")

    p = sub.add_parser("maintenance", help="take a node out of service (on) or back (off); "
                                           "an allocated node goes at its release")
    p.add_argument("node", help="node name or id")
    p.add_argument("mode", choices=("on", "off"))
    p.add_argument("--reason", help="why (shown by status); default 'no reason given'")
    p.add_argument("--force", action="store_true",
                   help="off for a node a cleaner is cleaning: drop its claim (otherwise "
                        "refused with 409 until the cleaner reports)")

    p = sub.add_parser("remove", help="remove a node that is not allocated")
    p.add_argument("node", help="node name or id")
    p.add_argument("--force", action="store_true",
                   help="remove it even if allocated (its allocation ends as 'removed')")

    sub.add_parser("delete_db", help="remove every node from the pool")

    sub.add_parser("hooks-dir", help="print the folder of the installed Jenkins hook scripts "
                                     "(pre_hook.sh, post_hook.sh, keep_lease.sh)")

    p = sub.add_parser("dead-letters", help="what landed in molteniron.dead-letters and why, "
                                            "oldest first (admin; needs no worker)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--show", type=_positive_int, default=20, metavar="N",
                        help="list the oldest N, leaving the queue as it was (default 20)")
    action.add_argument("--requeue", metavar="ID",
                        help="republish the dead letter ID to molteniron, then remove it; "
                             "the worker acts for the user who first sent it, not for you")
    action.add_argument("--purge", action="store_true", help="empty the dead-letter queue")
    _table_option(p)

    p = sub.add_parser("clean", help="send a ready or maintenance node to be cleaned again "
                                     "(needs cleaning_command on the worker)")
    p.add_argument("node", help="node name or id")

    p = sub.add_parser("history", help="who held which node, from when to when, how it ended "
                                       "(newest first)")
    p.add_argument("--owner", metavar="OWNER", help="only allocations of OWNER")
    p.add_argument("--node", metavar="NODE", help="only allocations of this node (name or id)")
    p.add_argument("--since", metavar="ISO",
                   help="only allocations open at or after this ISO-8601 time (UTC unless "
                        "it names its offset), e.g. 2024-03-04T11:00:00")
    p.add_argument("--limit", type=_positive_int, default=100, metavar="N",
                   help="at most N rows (default 100, at most 10000)")
    _table_option(p)

    p = sub.add_parser("export", help="write every node as YAML, the file import reads")
    p.add_argument("-o", "--file", dest="export_file", metavar="FILE",
                   help="write to FILE instead of stdout: a new file (mode 600 with "
                        "--show-secrets) that replaces FILE whole; a FILE that is a "
                        "symbolic link is refused")
    p.add_argument("--show-secrets", action="store_true",
                   help="write IPMI passwords (else ********, which import reads as "
                        "'keep the stored one')")

    p = sub.add_parser("import", help="add or update nodes by name from an export's YAML "
                                      "(all of them, or none if any entry is bad)",
                       description="Add or update nodes by name. Every entry is checked "
                       "first: one bad entry and nothing is imported. ipmi_password ******** "
                       "keeps the stored password. state: only ready and maintenance (with "
                       "maintenance_reason) are applied, and only to nodes that are not "
                       "allocated; an allocated node keeps its owner and cannot change "
                       "node_pool. Importing the same file again changes nothing.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("import_file", nargs="?", metavar="FILE", help="YAML written by export")
    source.add_argument("--from-original", metavar="DB_URL",
                        help="read the nodes of an original MoltenIron database instead "
                             "(mysql+pymysql://USER@HOST:PORT/DATABASE, or mysql://, e.g. "
                             "mysql://root@localhost/MoltenIron); every node comes in "
                             "ready, those it had provisioned included. A password in "
                             "DB_URL shows in the process list (ps) to every user of this "
                             "machine: put it in $MOLTENIRON_ORIGINAL_DB_PASSWORD instead "
                             "(it replaces one in DB_URL)")
    p = sub.add_parser("completion", help="print a bash completion script (install it once, "
                                          "e.g. in /usr/share/bash-completion/completions/"
                                          "molteniron)")
    p.add_argument("shell", choices=("bash",))

    for command_parser in sub.choices.values():
        _accept_global_options(parser, command_parser)
    return parser


# The top-level parser's options, accepted after the command too.
GLOBAL_OPTIONS = ("conf_dir", "config", "output", "timeout")


def _accept_global_options(parser: argparse.ArgumentParser,
                           command_parser: argparse.ArgumentParser) -> None:
    """The global options, as the top-level parser defines them, after the command too.

    There they have no default (SUPPRESS): one given before the command is kept. A
    command's own option wins a short name (export's -o is its file: --output there).
    """
    group = command_parser.add_argument_group("global options (also before the command)")
    taken = command_parser._option_string_actions  # noqa: SLF001 (argparse has no accessor)
    for action in parser._actions:  # noqa: SLF001
        if action.dest in GLOBAL_OPTIONS:
            group.add_argument(*(o for o in action.option_strings if o not in taken),
                               dest=action.dest, type=action.type or str, choices=action.choices,
                               metavar=action.metavar, help=action.help,
                               default=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in LOCAL_COMMANDS:  # no configuration, no broker
        return LOCAL_COMMANDS[args.command](args)
    if args.output is None:
        # A person at a terminal gets the table; a script gets the JSON reply, as always.
        as_table = (args.command in TABLE_COMMANDS and getattr(args, "type", None) != "json"
                    and sys.stdout.isatty())
        args.output = "result" if as_table else "json"
    try:
        config = load_config(args.config, args.conf_dir, client=True)
    except errors.ConfigError as exc:
        print(f"molteniron: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    from molteniron.clients.client import MoltenIronClient  # pika only once the arguments are good
    client = MoltenIronClient(config.amqp_url, args.timeout or config.request_timeout,
                              tls=config)
    # SIGINT explicitly too: Python leaves it ignored when it was ignored at start
    # (`molteniron allocate ... &` in a script), and a waiting allocate must be cancelled.
    # Only the first signal counts: a CI abort may send SIGTERM to the whole process group
    # while a hook passes one on too, and a second one must not cut the cancel short.
    def interrupt(signum, frame):
        if client.interrupted:
            return
        client.interrupted = True
        raise errors.Interrupted()
    previous = {signum: signal.signal(signum, interrupt)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        reply = run_command(client, args, config)
    except errors.MoltenIronError as exc:
        return _fail(exc, args)
    except (errors.Interrupted, KeyboardInterrupt):
        print("molteniron: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        client.close()
    if reply is not None:  # None: the command printed its result itself (export's YAML)
        _print(reply, args.output)
    return EXIT_OK


def hooks_dir() -> str:
    """The absolute path of the Jenkins hook scripts shipped in this package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks")


def _print_hooks_dir(args) -> int:
    path = hooks_dir()
    if not os.path.isfile(os.path.join(path, "pre_hook.sh")):
        print(f"molteniron: no hook scripts at {path}: this installation is incomplete",
              file=sys.stderr)
        return EXIT_USAGE
    print(path)
    return EXIT_OK


def _print_completion(args) -> int:
    from molteniron.clients import completion  # only this command pays for it
    print(completion.bash_script(build_parser()), end="")
    return EXIT_OK


# Commands answered here, without configuration or broker.
LOCAL_COMMANDS = {"hooks-dir": _print_hooks_dir, "completion": _print_completion}


def run_command(client, args, config) -> dict | None:
    """The command's reply; None: the command printed its result itself (export's YAML)."""
    command = args.command
    if command == "allocate":
        return _allocate(client, args, config)
    if command in ("status", "status_baremetal", "waiting", "history", "dead-letters"):
        return _listing(client, args, config)
    if command in ("export", "import"):
        return _inventory_command(client, args)
    calls = {
        "add_baremetal": lambda: client.add_baremetal(**_fields(args, (
            "name", "ipmi_ip", "ipmi_user", "ipmi_password", "allocation_pool", "port_hwaddr",
            "cpu_arch", "cpus", "ram_mb", "disk_gb", "node_pool", "tags"))),
        "add_keyvalue_pairs": lambda: client.add_keyvalue_pairs(**_fields(args, (
            "name", "ipmi_ip", "allocation_pool", "pairs", "tags"))),
        "add_json_blob": lambda: client.add_json_blob(**_fields(args, (
            "name", "ipmi_ip", "allocation_pool", "blob", "node_pool", "tags"))),
        "maintenance": lambda: client.call("maintenance", {
            "node": args.node, "mode": args.mode, "reason": args.reason, "force": args.force}),
        "remove": lambda: client.call("remove", {"node": args.node, "force": args.force}),
        "release": lambda: client.release(args.owner_name),
        "renew": lambda: client.renew(args.owner_name, args.lease),
        "get_field": lambda: _field_times(client.get_field(args.owner_name, args.field_name),
                                          args.field_name),
        "set_field": lambda: client.set_field(args.id, args.key, args.value, args.type,
                                              force=args.force),
        "cancel": lambda: client.cancel(args.request_id),
        "workers": client.workers,
        "delete_db": client.delete_db,
        "clean": lambda: client.call("clean", {"node": args.node}),
    }
    return calls[command]()


def _inventory_command(client, args) -> dict | None:
    """export: the YAML to FILE or stdout; import: a file's or an original database's nodes."""
    from molteniron.clients import inventory_file
    if args.command == "export":
        if args.export_file is not None:  # before asking: the pool is not sent for nothing
            inventory_file.refuse_symlink(args.export_file)
        reply = client.export(args.show_secrets)
        text = inventory_file.dump(reply["nodes"])
        if args.export_file is None:
            sys.stdout.write(text)
            return None
        inventory_file.write(args.export_file, text, secret=args.show_secrets)
        print(f"molteniron: wrote {len(reply['nodes'])} node(s) to {args.export_file}",
              file=sys.stderr)
        return {"status": 200, "exported": len(reply["nodes"]), "file": args.export_file}
    if args.from_original is not None:
        inventory, notes = inventory_file.read_original(
            args.from_original, os.environ.get(inventory_file.ORIGINAL_DB_PASSWORD_ENV))
        for note in notes:
            print(f"molteniron: {note}", file=sys.stderr)
    else:
        inventory = inventory_file.read(args.import_file)
    reply = client.import_inventory(inventory)
    print(f"molteniron: {reply['added']} added, {reply['changed']} changed, "
          f"{reply['unchanged']} unchanged", file=sys.stderr)
    return reply


def _listing(client, args, config) -> dict:
    """status, status_baremetal, waiting, history, dead-letters: the reply as is (waiting,
    history, dead-letters without -t and a terminal), -t json's rows, or a table."""
    from molteniron.clients import output
    command = args.command
    table_type = args.type or ("human" if args.output == "result" else None)
    # A table shown on a terminal fits it; in a pipe or a file every value stays whole.
    fit_to = _terminal_columns() if args.output == "result" and sys.stdout.isatty() else None
    if command in ("status", "status_baremetal"):
        records = client.status(args.pool, args.show_secrets, args.state, args.owner)["nodes"]
        if args.type == "json":
            return {"status": 200, "result": output.status_rows(records)}
        columns, rows = output.status_cells(records, command == "status_baremetal")
        return {"status": 200, "result": output.table(columns, rows, args.type or "human",
                                                      fit_to)}
    if command == "dead-letters":
        from molteniron.clients import dead_letters
        if args.purge or args.requeue or table_type is None:
            return dead_letters.run(args, config)
        # The whole reply, whose rows are then shown here like the other listings'.
        reply = dead_letters.run(argparse.Namespace(**{**vars(args), "type": None,
                                                        "output": "json"}), config)
        key, columns = "dead_letters", dead_letters.COLUMNS
        if table_type != "json":
            print(f"molteniron: {reply['shown']} of {reply['total']} dead letter(s), "
                  "oldest first", file=sys.stderr)
    elif command == "waiting":
        from molteniron import compat
        reply, key, columns = client.waiting(args.pool), "waiting", compat.WAITING_COLUMNS
    else:
        from molteniron import compat
        reply = client.history(args.owner, args.node, args.since, args.limit)
        key, columns = "history", compat.HISTORY_COLUMNS
    if table_type is None:
        return reply
    if table_type == "json":
        return {"status": 200, "result": output.with_offsets(reply[key])}
    return {"status": 200, "result": output.table(
        columns, output.record_cells(columns, reply[key]), table_type, fit_to)}


def _field_times(reply: dict, field_name: str) -> dict:
    """get_field of a time (allocated_at, lease_expires_at): each value with its offset."""
    from molteniron.clients import output
    if field_name not in output.TIME_KEYS:
        return reply
    return {**reply, "result": [{**entry, "field": output.iso_time(entry["field"])}
                                for entry in reply["result"]]}


def _allocate(client, args, config) -> dict:
    wait = None if args.no_wait else (args.wait or config.allocate_wait)
    progress = None
    if sys.stderr.isatty() and wait is not None:
        progress = _Progress(args.number_of_nodes, args.node_pool)
    sent: list[str] = []
    try:
        return client.allocate(args.owner_name, args.number_of_nodes, args.node_pool, wait,
                               lease_seconds=args.lease, on_progress=progress, on_sent=sent.append,
                               constraints={k: getattr(args, k) for k in ALLOCATE_OPTIONS
                                            if getattr(args, k) is not None})
    except (errors.Interrupted, KeyboardInterrupt):
        if sent:  # whatever state the request is in, it must not leave us owning nodes
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            client.close()  # the interrupted connection may be mid-read
            client.interrupted = False  # the signals are ignored now: failures are real
            client.cancel(sent[0], quiet=True)
        raise
    finally:
        if progress:
            progress.done()


class _Progress:
    """One updating line on a terminal while an allocate waits."""

    def __init__(self, count: int, node_pool: str):
        self.started = time.monotonic()
        self.what = f"{count} node(s) of pool {node_pool}"
        self.position = None
        self.shown = False

    def __call__(self, reply: dict | None) -> None:
        if reply is not None:
            self.position = reply.get("position")
        place = f", position {self.position} in queue" if self.position else ""
        sys.stderr.write(f"\rwaiting for {self.what}{place}, "
                         f"{time.monotonic() - self.started:.0f}s \033[K")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _fail(exc: errors.MoltenIronError, args) -> int:
    from molteniron.clients.output import with_offsets
    reply = exc.reply or exc.to_reply()
    print(json.dumps(with_offsets(protocol.without_envelope(reply))))
    print(f"molteniron: {exc.message}", file=sys.stderr)
    if exc.reply is None and isinstance(exc, (errors.BadRequest, errors.ConfigError)):
        return EXIT_USAGE  # refused here, before anything was sent
    from molteniron.clients.client import BrokerUnusable
    if isinstance(exc, BrokerUnusable):
        return EXIT_USAGE  # the broker refused us, or we it: only a person can fix that
    if isinstance(exc, errors.DeadlineExpired):
        # Only an allocate has a deadline of its own; for anything else the
        # worker was too busy to answer in time.
        return EXIT_DEADLINE if args.command == "allocate" else EXIT_UNAVAILABLE
    if isinstance(exc, (errors.ServiceUnavailable, errors.RequestQueued)):
        return EXIT_UNAVAILABLE
    if isinstance(exc, errors.NodesTakenBack):
        return EXIT_TAKEN_BACK
    return EXIT_REFUSED


def _print(reply: dict, output: str) -> None:
    from molteniron.clients.output import with_offsets  # every time printed has its offset
    reply = with_offsets(protocol.without_envelope(reply))
    if output == "result" and "result" in reply:
        result = reply["result"]
        print(result if isinstance(result, str) else json.dumps(result))
    else:
        print(json.dumps(reply))


ALLOCATE_OPTIONS = ("arch", "min_cpus", "min_ram_mb", "min_disk_gb", "tags", "priority")


STATUS_COLUMNS_HELP = (
    "A table of the pool's nodes: id, name, ipmi_ip, blob (status: the hardware fields as "
    "JSON; status_baremetal: a column each), status (the node's state, with its "
    "maintenance reason or cleaner), provisioned (its owner), time (how long it has been "
    "held), node_pool, lease_ends (when it goes back unless renewed), tags. On a terminal "
    "the table fits its width (long free text is cut, and said on stderr); in a pipe or "
    "a file every value is whole.")


def _table_option(parser, default: str | None = None,
                  json_rows: str = "the rows, under the table's column names") -> None:
    parser.add_argument("-t", "--type", choices=("human", "csv", "json"), default=None,
                        help="human: a table (on a terminal, fitted to its width); csv: a "
                             "header row, then one row each; json: " + json_rows +
                             " (default: " + (default or "human on a terminal, "
                                              "else the JSON reply") + ")")


def _tags_option(parser) -> None:
    parser.add_argument("--tags", metavar="A,B", help="tags that allocate --tag can ask for")


def _fields(args, names) -> dict:
    return {name: getattr(args, name) for name in names}


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _int_at_least(minimum: int):
    """An argparse type: a whole number no smaller than minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
        return value
    return parse


_non_negative_int, _positive_int = _int_at_least(0), _int_at_least(1)


if __name__ == "__main__":
    sys.exit(main())
