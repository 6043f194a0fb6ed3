"""molteniron-web over HTTP against a real worker: the JSON API, /healthz, the cache that
makes many browsers cost the worker what one does, basic auth, and no secret anywhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from urllib.parse import quote, urlsplit

import pytest

from tests.stack import ROOT, node_args, wait_until
from tests.web import WebProcess

FAST = ("--refresh", "1", "--sample-every", "1")
READ_ONLY = {"summary", "status", "waiting", "workers", "history"}


@pytest.fixture
def web(request, tmp_path):
    """web(env, *args): a molteniron-web process, stopped after the test."""
    started: list[WebProcess] = []

    def start(env: dict, *args: str) -> WebProcess:
        process = WebProcess(env, tmp_path, *FAST, *args, name=f"web-{len(started)}")
        started.append(process)
        return process
    yield start
    for process in started:
        process.stop()
        if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
            print(f"--- {process.log_path.name} ---\n{process.log()[-4000:]}")


def is_iso_with_offset(text) -> bool:
    return isinstance(text, str) and datetime.fromisoformat(text).utcoffset() is not None


def pools(answer) -> dict:
    return {p["node_pool"]: p for p in answer.json["pools"]}


def test_the_api_shows_the_pool_as_the_worker_has_it_and_never_a_secret(secured, users, web):
    stack, admin = secured, users["admin"]["env"]
    assert stack.cli("add_baremetal", *node_args(3, "gpu"), "--tags", "gpu,big",
                     env=admin).returncode == 0
    assert stack.cli("add_json_blob", "node-4", "10.0.0.4", "10.1.4.1", json.dumps({
        "ipmi_user": "root", "ipmi_password": "secret-4", "port_hwaddr": "aa:bb:cc:dd:ee:04",
        "cpu_arch": "aarch64", "cpus": 4, "ram_mb": 8192, "disk_gb": 100,
        "bmc_token": "secret-token-4", "rack": "r7"}), "gpu", env=admin).returncode == 0
    assert stack.cli("allocate", "job-1", "1", "gpu", "--tag", "gpu", "--lease", "3600",
                     env=users["alice"]["env"]).returncode == 0
    assert stack.cli("maintenance", "node-2", "on", "--reason", "fan broken",
                     env=admin).returncode == 0
    # The web process logs in as a CI user of its own (bob here): no admin rights.
    bob = users["bob"]
    site = web({**stack.env, **bob["env"]})

    summary = pools(site.get("/api/v1/pools"))
    assert {k: summary["gpu"][k] for k in ("nodes", "ready", "allocated", "maintenance")} == {
        "nodes": 2, "ready": 1, "allocated": 1, "maintenance": 0}
    assert (summary["default"]["ready"], summary["default"]["maintenance"]) == (1, 1)

    nodes = {n["name"]: n for n in site.get("/api/v1/nodes").json["nodes"]}
    held = nodes["node-3"]
    assert (held["state"], held["owner"], held["user"], held["tags"]) == (
        "allocated", "job-1", users["alice"]["name"], ["big", "gpu"])
    assert is_iso_with_offset(held["allocated_at"]) and is_iso_with_offset(
        held["lease_expires_at"])
    assert 3500 < held["lease_remaining_s"] <= 3600
    assert nodes["node-2"]["maintenance_reason"] == "fan broken"
    assert nodes["node-4"]["hardware"]["rack"] == "r7"
    assert nodes["node-4"]["hardware"]["cpu_arch"] == "aarch64"
    assert "bmc_token" not in nodes["node-4"]["hardware"]

    # Filters and pages, in id order.
    def names(query: str) -> list[str]:
        return [n["name"] for n in site.get(f"/api/v1/nodes?{query}").json["nodes"]]
    assert names("pool=gpu") == ["node-3", "node-4"]
    assert names("state=maintenance") == ["node-2"]
    assert names("owner=job-1") == names("tag=big") == names("name=DE-3") == ["node-3"]
    first = site.get("/api/v1/nodes?limit=3").json
    assert [n["name"] for n in first["nodes"]] == ["node-1", "node-2", "node-3"]
    assert first["matching"] == 4 and first["next_after"] == nodes["node-3"]["id"]
    rest = site.get(f"/api/v1/nodes?limit=3&after={first['next_after']}").json
    assert [n["name"] for n in rest["nodes"]] == ["node-4"] and rest["next_after"] is None
    for bad in ("state=broken", "limit=0", "limit=1001", "after=-1"):
        refused = site.get(f"/api/v1/nodes?{bad}")
        assert refused.status == 400 and refused.json["error"] == "BadQuery", bad

    # Nothing secret, in any answer or page: IPMI passwords, the blob's token, the
    # broker logins' passwords (the web's own included), and nothing in its log.
    answers = [site.get(path) for path in (
        "/api/v1/pools", "/api/v1/nodes", "/api/v1/waiting", "/api/v1/history",
        "/api/v1/workers", "/healthz", "/", "/nodes", "/queue", "/history", "/workers",
        "/nodes?state=allocated", "/api/v1/nodes?pool=gpu")]
    assert all(a.status == 200 for a in answers), [a for a in answers if a.status != 200]
    passwords = [urlsplit(u["env"]["MOLTENIRON_AMQP_URL"]).password for u in users.values()]
    secrets = ["secret-", "secret-token-4", "ipmi_password", "********", *passwords]
    for answer in answers:
        for secret in secrets:
            assert secret not in answer.text, (secret, answer)
    for secret in secrets[:2] + passwords:
        assert secret not in site.log()

    # Only read-only operations reached the worker from the web's login.
    asked = set(re.findall(rf"op=(\w+) id=\S+ user={re.escape(bob['name'])} ",
                           stack.worker_log()))
    assert asked and asked <= READ_ONLY, asked


def test_history_is_searched_by_owner_node_and_time_and_paged(running, web):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    for i in range(5):
        assert running.cli("allocate", f"job-{i}", "1").returncode == 0
        assert running.cli("release", f"job-{i}").returncode == 0
    running.cli("allocate", "holder", "2")
    site = web(running.env)

    everything = site.get("/api/v1/history").json
    rows = everything["history"]
    assert [r["owner"] for r in rows[:2]] == ["holder", "holder"] and len(rows) == 7
    assert rows[0]["ended_at"] is None and rows[2]["end_reason"] == "released"
    assert all(is_iso_with_offset(r["started_at"]) for r in rows)
    assert "request_id" not in rows[0] and everything["next_after"] is None

    seen, after = [], ""
    while True:
        page = site.get(f"/api/v1/history?limit=3{after}").json
        seen += page["history"]
        if page["next_after"] is None:
            break
        after = "&after=" + quote(page["next_after"])
    assert seen == rows

    assert [r["owner"] for r in site.get("/api/v1/history?owner=job-3").json["history"]] == [
        "job-3"]
    assert {r["node_name"] for r in site.get("/api/v1/history?node=node-2").json[
        "history"]} == {"node-2"}
    # until: started by then; since: still held at or after then (with an offset, too).
    # (Times are shown to the second: until takes that whole second.)
    cut = rows[4]["started_at"]  # job-2's
    until = site.get("/api/v1/history?until=" + quote(cut)).json["history"]
    assert [r["owner"] for r in until] == [r["owner"] for r in rows if r["started_at"] <= cut]
    assert "job-2" in [r["owner"] for r in until]
    since = site.get("/api/v1/history?since=" + quote(rows[2]["started_at"])).json["history"]
    assert [r["owner"] for r in since][:3] == ["holder", "holder", "job-4"]
    refused = site.get("/api/v1/history?since=yesterday")
    assert refused.status == 400 and "ISO-8601" in refused.json["message"]
    # The page shows the same search, and links to the older page.
    html = site.get("/history?owner=job-3").text
    assert 'data-owner="job-3"' in html and 'data-owner="job-4"' not in html


def test_the_queue_shows_who_waits_for_what_and_workers_the_dead_letters(running, web):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    waiting = running.cli_start("allocate", "job-w", "1", "--wait", "600", "--priority", "7",
                                "--min-cpus", "4")
    site = web(running.env)
    try:
        rows = wait_until(lambda: site.get("/api/v1/waiting").json["waiting"], 20,
                          "job-w to show in the queue")
        (row,) = rows
        assert (row["owner"], row["count"], row["priority"], row["position"]) == (
            "job-w", 1, 7, 1)
        assert row["constraints"]["min_cpus"] == 4 and row["user"] == "guest"
        assert is_iso_with_offset(row["deadline"]) and is_iso_with_offset(row["enqueued_at"])
        assert 'data-owner="job-w"' in site.get("/queue").text
        assert pools(site.get("/api/v1/pools"))["default"]["waiting"] == 1
    finally:
        running.cli("release", "holder")
        assert waiting.result().returncode == 0
    wait_until(lambda: site.get("/api/v1/waiting").json["waiting"] == [], 10,
               "job-w to leave the queue")

    workers = site.get("/api/v1/workers").json
    assert workers["consumers"] == 1 and workers["dead_letters"] == 0
    (worker,) = workers["workers"]
    assert worker["worker_id"] == "test-worker-0" and is_iso_with_offset(worker["last_seen"])
    # A request that expired unseen lands in the dead letters: the page counts it.
    connection, channel = running.channel()
    try:
        channel.basic_publish("", "molteniron.dead-letters", b"{}")
    finally:
        connection.close()
    wait_until(lambda: site.get("/api/v1/workers").json["dead_letters"] == 1, 10,
               "the dead letter to be counted")
    assert re.search(r'id="dead-letters">1<', site.get("/workers").text)


def test_healthz_follows_whether_a_worker_answers(stack, web):
    site = web(stack.env)
    assert site.get("/healthz").status == 503  # no worker yet
    assert "No answer from the pool" in site.get("/").text
    assert site.get("/").status == 503 and site.get("/api/v1/pools").status == 503
    stack.start_worker()
    wait_until(lambda: site.get("/healthz").status == 200, 20, "healthz to say 200")
    stack.stop_workers()
    wait_until(lambda: site.get("/healthz").status == 503, 30, "healthz to say 503")


def test_many_browsers_cost_the_worker_what_one_does(running, web):
    for i in range(1, 4):
        running.cli("add_baremetal", *node_args(i))
    site = web(running.env, "--sample-every", "3600")  # only the pages ask
    site.get("/healthz")
    before = running.worker_log().count("op=summary")
    started = time.monotonic()
    errors = []

    def browse():
        for _ in range(15):
            for path in ("/", "/api/v1/pools", "/healthz"):
                if site.get(path).status != 200:
                    errors.append(path)
    threads = [threading.Thread(target=browse) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    asked = running.worker_log().count("op=summary") - before
    # 450 answers; the worker was asked at most once per 2 s (and once more at the edge).
    assert not errors and asked <= elapsed / 2 + 2, (asked, elapsed)


def test_basic_auth_from_a_password_file(running, web, tmp_path):
    made = subprocess.run([sys.executable, "-m", "molteniron.clients.web",
                           "--hash-password", "ops"],
                          input="correct horse battery\n", capture_output=True, text=True,
                          cwd=ROOT, env=running.env, timeout=60)
    assert made.returncode == 0, made
    line = made.stdout.strip()
    assert line.startswith("ops:scrypt:") and "correct horse" not in line
    path = tmp_path / "web.passwords"
    path.write_text(f"# who may look\n{line}\n")
    site = web(running.env, "--password-file", str(path))

    asked = site.get("/")
    assert asked.status == 401 and asked.headers["WWW-Authenticate"].startswith("Basic ")
    import base64

    def login(user, password):
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    assert site.get("/api/v1/pools", login("ops", "wrong")).status == 401
    assert site.get("/api/v1/pools", login("nobody", "correct horse battery")).status == 401
    assert site.get("/api/v1/pools", login("ops", "correct horse battery")).status == 200
    assert site.get("/healthz").status == 200  # probes need no login
    assert "correct horse" not in site.log()

    path.write_text("ops:plain-text\n")
    refused = subprocess.run([sys.executable, "-m", "molteniron.clients.web",
                              "--password-file", str(path), "--address", "127.0.0.1:0"],
                             capture_output=True, text=True,
                             cwd=ROOT, env=running.env, timeout=60)
    assert refused.returncode == 2 and "scrypt or pbkdf2" in refused.stderr
