"""molteniron-web as the kit ships it: its broker user (a CI user's rights, enough to
serve every page), its unit (hardened like the others, disabled), install.sh --web."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from tests.definitions import DEFINITIONS, permissions_of
from tests.kit import DEPLOY, HARDENING, copy_checkout, install, public_python, service_settings
from tests.stack import node_args
from tests.web import WebProcess

UNIT = "molteniron-web.service"


def test_the_web_user_has_a_ci_users_broker_rights_and_no_password():
    (user,) = [u for u in DEFINITIONS["users"] if u["name"] == "molteniron-web"]
    assert user["password_hash"] == "" and "password" not in user
    assert permissions_of("molteniron-web") == permissions_of("molteniron-ci")


def test_every_page_is_served_with_only_the_web_users_permissions(running, broker_users,  # noqa: F811
                                                                  tmp_path):
    running.cli("add_baremetal", *node_args(1))
    web_user = broker_users("molteniron-web")
    site = WebProcess({**running.env, **web_user.env}, tmp_path)
    try:
        for path in ("/", "/nodes", "/queue", "/history", "/workers", "/api/v1/pools",
                     "/api/v1/nodes", "/api/v1/waiting", "/api/v1/history", "/healthz"):
            assert site.get(path).status == 200, path
        # The depth of both queues by passive declares, which need no permission.
        workers = site.get("/api/v1/workers").json
        assert (workers["queued_requests"], workers["dead_letters"]) == (0, 0)
        assert workers["consumers"] == 1
    finally:
        site.stop()
    # A refusal, not the digits 403 inside the run's random vhost name.
    assert not re.search(r"ACCESS_REFUSED|\b403\b|refused", site.log()), site.log()


def test_the_unit_runs_as_its_own_user_hardened_and_out_of_the_others_secrets():
    settings = service_settings(UNIT)
    assert (settings["User"], settings["Group"]) == (["molteniron-web"], ["molteniron-web"])
    assert settings["SupplementaryGroups"] == ["molteniron"]  # conf.yaml only
    assert settings["EnvironmentFile"] == ["/etc/molteniron/web.environment"]
    assert set(settings["InaccessiblePaths"][0].split()) == {
        "-/etc/molteniron/environment", "-/etc/molteniron/cleaner.environment",
        "-/etc/molteniron/secret.keys"}
    assert shlex.split(settings["ExecStart"][0]) == [
        "/opt/molteniron/bin/molteniron-web", "--config", "/etc/molteniron/conf.yaml"]
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], key
    assert "@system-service" in settings["SystemCallFilter"]
    assert "WantedBy=multi-user.target" in (DEPLOY / UNIT).read_text()


@pytest.mark.install  # pip-installs the package into a venv of its own
def test_install_web_writes_the_login_and_the_unit_verifies(tmp_path):
    root = tmp_path / "root"
    done = install(root, copy_checkout(tmp_path / "source"), "--web", "--python",
                   public_python(), pip_options=("--no-deps",))
    if done.returncode != 0:
        pytest.fail(f"install.sh --web failed (pip needs its package index):\n"
                    f"{done.stderr[-3000:]}", pytrace=False)
    etc = root / "etc" / "molteniron"
    assert (root / "usr" / "local" / "bin" / "molteniron-web").resolve() == (
        root / "opt" / "molteniron" / "bin" / "molteniron-web")
    environment = (etc / "web.environment").read_text()
    assert "MOLTENIRON_AMQP_URL=amqp://molteniron-web@" in environment
    assert re.search(r"^MOLTENIRON_AMQP_PASSWORD=[0-9a-f]{48}$", environment, re.M)
    assert (etc / "web.environment").stat().st_mode & 0o777 == 0o600
    assert re.search(rf"^install\.sh: {re.escape(str(etc))}/web\.environment root:root 600",
                     done.stderr, re.M)
    unit = root / "etc" / "systemd" / "system" / UNIT
    assert unit.read_text() == (DEPLOY / UNIT).read_text()

    if shutil.which("systemd-analyze") is None:
        return  # (test_deploy_kit says so for the other units)
    copy = tmp_path / UNIT
    copy.write_text(unit.read_text().replace("/opt/molteniron/", f"{root}/opt/molteniron/")
                    .replace("/etc/molteniron/", f"{etc}/"))
    verified = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified
    rated = subprocess.run(["systemd-analyze", "security", "--offline=true", str(copy)],
                           capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", rated.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0, rated.stdout[-2000:]

