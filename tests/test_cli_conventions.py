"""Issue 21, CLI conventions: options after the command, json and tables that agree,
times with their offset, tables that fit the terminal, completion, hooks-dir."""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
from datetime import datetime

from molteniron.clients import cli, output
from tests.completion import complete
from tests.raw import RawPublisher
from tests.stack import ROOT, node_args, wait_until
from tests.terminal import on_a_terminal


def cli_alone(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI with no broker, no worker and a configuration file that is not there."""
    return subprocess.run([sys.executable, "-m", "molteniron.clients.cli", *args],
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
                               "MOLTENIRON_CONFIG": "/nonexistent/molteniron.yaml",
                               **(env or {})},
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)


def test_hooks_dir_prints_the_folder_of_the_shipped_hooks_without_config_or_broker():
    done = cli_alone("hooks-dir")
    assert done.returncode == 0, done
    path = done.stdout.strip()
    assert done.stdout == path + "\n" and os.path.isabs(path), done
    assert {"pre_hook.sh", "post_hook.sh", "keep_lease.sh"} <= set(os.listdir(path))
    assert all(os.access(os.path.join(path, name), os.X_OK)
               for name in ("pre_hook.sh", "post_hook.sh", "keep_lease.sh"))


# --- global options after the command --------------------------------------------------

def test_global_options_after_the_command_mean_what_they_mean_before_it():
    parser = cli.build_parser()
    for before, after in (
            (["--timeout", "3", "status"], ["status", "--timeout", "3"]),
            (["-o", "json", "allocate", "me", "1"], ["allocate", "me", "1", "-o", "json"]),
            (["--config", "/etc/mi.yaml", "-c", "/etc/mi", "waiting"],
             ["waiting", "--config", "/etc/mi.yaml", "-c", "/etc/mi"]),
            # export's own -o is its file: there the global one is --output
            (["--output", "result", "export", "-o", "nodes.yaml"],
             ["export", "-o", "nodes.yaml", "--output", "result"])):
        assert vars(parser.parse_args(after)) == vars(parser.parse_args(before)), after
    args = parser.parse_args(["--timeout", "5", "allocate", "me", "2", "big", "--timeout", "3"])
    assert (args.timeout, args.owner_name, args.number_of_nodes, args.node_pool) == (
        3.0, "me", 2, "big")  # the one after the command wins; the arguments parse as ever


def test_config_named_after_the_command_is_the_one_read():
    done = cli_alone("status", "--config", "/nonexistent/other.yaml")
    assert done.returncode == 2, done
    assert "cannot read configuration /nonexistent/other.yaml" in done.stderr, done


def test_every_commands_help_lists_the_global_options():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command_parser in commands.choices.items():
        text = command_parser.format_help()
        assert "global options (also before the command):" in text, name
        assert "--config FILE" in text and "--timeout SECONDS" in text, name
    assert "-o {json,result}" not in commands.choices["export"].format_help()


# --- -t json and the tables: one name per field; times with their offset ------------------

def has_offset(text) -> bool:
    """An ISO 8601 time that says its offset from UTC."""
    try:
        return datetime.fromisoformat(text).utcoffset() is not None
    except (TypeError, ValueError):
        return False


def as_cell(value) -> str:
    """A json value as the csv table shows it."""
    if value is None:
        return ""
    return ",".join(value) if isinstance(value, list) else str(value)


def agree(stack, *listing: str, derived: tuple = ()) -> list[dict]:
    """The -t json rows of a listing, checked against its csv: each column but the derived
    ones is a field of the same name and value. Options after the command, too."""
    rows = stack.cli(*listing, "-t", "json", "--timeout", "20").json["result"]
    text = stack.cli(*listing, "-t", "csv", "--output", "result").stdout
    header, *cells = csv.reader(io.StringIO(text))
    assert len(cells) == len(rows) > 0, (listing, text)
    for row, line in zip(rows, cells):
        for name, cell in zip(header, line):
            if name not in derived:
                assert name in row, (listing, name, row)
                assert as_cell(row[name]) == cell, (listing, name, row, line)
    return rows


def test_json_rows_name_fields_as_the_tables_do_and_every_time_has_its_offset(running):
    for i in (1, 2, 3):
        running.cli("add_baremetal", *node_args(i), "--tags", "gpu,big")
    running.cli("allocate", "job-1", "1")
    running.cli("release", "job-1")
    allocated = running.cli("allocate", "job-2", "1")
    waiter = running.cli_start("allocate", "job-3", "3", "--wait", "60")
    wait_until(lambda: running.cli("waiting").json["waiting"], 20, "job-3 to wait")
    garbage = RawPublisher(running.amqp_url)
    garbage.publish(b"not a request", reply=False)
    wait_until(lambda: running.dead_letters() == 1, 20, "the dead letter")
    garbage.close()

    nodes = agree(running, "status", derived=("blob", "time"))
    assert {(n["name"], n["status"], n["provisioned"], tuple(n["tags"])) for n in nodes} == {
        ("node-1", "allocated", "job-2", ("big", "gpu")), ("node-2", "ready", None, ("big", "gpu")),
        ("node-3", "ready", None, ("big", "gpu"))}
    agree(running, "status_baremetal", derived=("time",))
    (held,) = [n for n in nodes if n["provisioned"]]
    assert has_offset(held["allocated_at"]) and has_offset(held["lease_ends"]), held
    (waiting,) = agree(running, "waiting", derived=("waited_s",))  # grows between the two
    assert has_offset(waiting["deadline"]), waiting
    history = agree(running, "history")
    assert all(has_offset(r["started_at"]) for r in history)
    assert [has_offset(r["ended_at"]) for r in history] == [False, True]  # open, released
    (letter,) = agree(running, "dead-letters")
    assert has_offset(letter["died_at"]), letter

    # The whole replies too: allocate (the original's shape), renew, get_field, waiting.
    (node,) = allocated.json["nodes"].values()
    assert has_offset(node["timestamp"]) and has_offset(node["lease_expires_at"]), node
    assert has_offset(running.cli("renew", "job-2").json["lease_expires_at"])
    assert has_offset(running.cli("get_field", "job-2", "allocated_at").json["result"][0]["field"])
    assert has_offset(running.cli("waiting").json["waiting"][0]["deadline"])
    assert has_offset(running.cli("history").json["history"][0]["started_at"])

    running.cli("release", "job-2")
    assert waiter.result().returncode == 0


# --- tables on a terminal ------------------------------------------------------------------

def test_a_table_on_a_terminal_fits_it_and_shows_tags_and_a_pipe_keeps_every_value(running):
    running.cli("add_baremetal", *node_args(1), "--tags", "gpu,big")
    running.cli("add_baremetal", *node_args(2))
    running.cli("allocate", "a-job-whose-name-says-a-great-deal-" + "x" * 40, "1")

    for columns in (140, 180):  # status needs about 130: its times, ids and names stay whole
        table, stderr = on_a_terminal(running.env, "status", columns=columns)
        lines = table.splitlines()
        assert all(len(line) <= columns for line in lines), (columns, table)
        assert lines[1].split()[-2:] == ["tags", "+"], table
        assert f"cut to fit {columns} columns" in stderr, stderr
        assert "node-1" in table and "node-2" in table
    wide, stderr = on_a_terminal(running.env, "status", "-t", "human", columns=400)
    assert "cut" not in stderr and "big,gpu" in wide and "x" * 40 in wide, wide

    piped = running.cli("status", "-o", "result").stdout  # to a file or a pipe: all of it
    assert "big,gpu" in piped and "x" * 40 in piped
    assert '"port_hwaddr": "aa:bb:cc:dd:ee:01"' in piped


def test_a_cut_cell_says_so_and_a_table_without_a_width_is_whole(capsys):
    columns = (("id", 4), ("blob", 40), ("status", 8), ("owner", 5), ("lease_ends", 10))
    rows = [[1, "b" * 100, "maintenance (BMC broken)", "job-" + "y" * 30,
             "2026-12-06T18:22:36+00:00"]]
    fitted = output.table(columns, rows, "human", fit_to=80).splitlines()
    assert max(map(len, fitted)) == 80
    assert "2026-12-06T18:22:36+00:00" in fitted[3] and "maintenance" in fitted[3]
    assert "3 cell(s) cut to fit 80 columns" in capsys.readouterr().err
    whole = output.table(columns, rows, "human")
    assert "b" * 100 in whole and "y" * 30 in whole and capsys.readouterr().err == ""


def test_times_are_given_their_offset():
    assert output.iso_time("2026-12-06T18:22:36") == "2026-12-06T18:22:36+00:00"
    assert output.iso_time("2026-12-06T18:22:36Z") == "2026-12-06T18:22:36+00:00"
    assert output.iso_time("2026-12-06T18:22:36+02:00") == "2026-12-06T18:22:36+02:00"
    assert output.iso_time(1700000000.25) == "2023-11-14T22:13:20+00:00"  # waiting's deadline
    assert [output.iso_time(v) for v in (None, "soon", True)] == [None, "soon", True]
    assert output.with_offsets({"nodes": {"node_1": {"timestamp": "2026-12-06T18:22:36",
                                                     "name": "2026-12-06"}}}) == {
        "nodes": {"node_1": {"timestamp": "2026-12-06T18:22:36+00:00", "name": "2026-12-06"}}}


# --- completion ---------------------------------------------------------------------------

def test_completion_bash_completes_commands_options_and_choices(tmp_path):
    done = cli_alone("completion", "bash")
    assert done.returncode == 0 and done.stderr == "", done
    script = tmp_path / "molteniron.bash"
    script.write_text(done.stdout)
    registered = subprocess.run(["bash", "-c", f'source "{script}"; complete -p molteniron'],
                                capture_output=True, text=True, check=True)
    assert registered.stdout.strip() == "complete -F _molteniron molteniron"
    assert complete(str(script), "molteniron", "al") == ["allocate"]
    assert complete(str(script), "molteniron", "--timeout", "3", "status_b") == [
        "status_baremetal"]
    assert complete(str(script), "molteniron", "status", "-t", "") == ["human", "csv", "json"]
    assert complete(str(script), "molteniron", "maintenance", "node-1", "o") == ["on", "off"]
    assert "--no-wait" in complete(str(script), "molteniron", "allocate", "job", "1", "--n")
    assert complete(str(script), "molteniron", "status", "--ti") == ["--timeout"]
    assert complete(str(script), "molteniron", "import", str(tmp_path / "molteniron.b")) == [
        str(script)]

    # An ordinary command does not pay for it.
    probe = ("import sys; from molteniron.clients import cli; "
             "cli.build_parser().parse_args(['allocate', 'job', '1']); "
             "print('molteniron.clients.completion' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout.strip() == "False"
