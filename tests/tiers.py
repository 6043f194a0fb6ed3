"""Test tiers, as markers every test gets from what it needs:

- unit: no service at all (`python -m pytest -m unit tests` runs with RabbitMQ and
  MariaDB unreachable);
- db: the test run's MariaDB database (fixtures `database_url`, `engine`, `session`...);
- stack: the test run's RabbitMQ vhost too, and worker processes (`amqp_url`, `stack`...);
- cluster: private brokers or databases the test starts, stops and breaks itself;
- install: the package built, or installed into a venv of its own (pip: slow, and it
  may need the package index), the fixtures in INSTALL_FIXTURES.

The markers are registered in pyproject.toml ([tool.pytest.ini_options] markers,
with --strict-markers). A test marked with one of them by hand keeps its mark;
otherwise the fixtures it uses decide, and the modules in CLUSTER_MODULES are
`cluster` whatever they use. A test that starts a private service itself, with no
fixture that says so, is marked `cluster` by hand.

Run in parallel (pytest-xdist, `-n 4 --dist loadgroup`), each worker process has its own
database and vhost (conftest.py, stack.py: session fixtures, made once per process).
A fixture made once per module (a private broker, a cluster, an installed kit, a
browser) would be made again by every worker that runs one of the module's tests: the
tests that use one get `xdist_group(<module>)`, so that one worker runs them all.
"""

from __future__ import annotations

import pytest

TIERS = ("unit", "db", "stack", "cluster", "install")
# Modules that start private services (bench/private.py) or run the bench against
# services of their own.
CLUSTER_MODULES = frozenset({
    "test_broker_cluster", "test_galera_cluster", "test_private_services",
    "test_broker_tls", "test_broker_limits", "test_read_only_database", "test_reliability",
    "test_reliability_badinput", "test_faults", "test_containers", "test_one_clock",
})
# Module-scoped fixtures that build the package (tests/test_package.py) or install it
# with deploy/install.sh (tests/test_deploy_kit.py).
INSTALL_FIXTURES = frozenset({"dists", "installed"})
# Fixtures that start a private broker or database (tests/tls.py), in whatever module.
CLUSTER_FIXTURES = frozenset({"tls_broker"})


@pytest.hookimpl(tryfirst=True)  # before xdist reads xdist_group
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(getattr(pytest.mark, tier_of(item)))
        group = shared_fixture_group(item)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
    slowest_first(items)


def slowest_first(items) -> None:
    """Modules with cluster tests first, then install, stack, db, unit; each module's
    tests stay together and in order. xdist hands tests out in this order: a run whose
    longest tests (a cluster test takes up to 2.5 minutes) start last ends on one busy
    process while the others idle."""
    rank = {tier: place for place, tier in enumerate(("cluster", "install", "stack", "db",
                                                      "unit"))}
    module_rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.partition("::")[0]
        tier = next(t for t in TIERS if item.get_closest_marker(t))
        module_rank[module] = min(module_rank.get(module, len(rank)), rank[tier])
    items.sort(key=lambda item: module_rank[item.nodeid.partition("::")[0]])


def tier_of(item) -> str:
    module = item.module.__name__.rpartition(".")[2] if item.module else ""
    fixtures = set(getattr(item, "fixturenames", ()))
    if module in CLUSTER_MODULES or fixtures & CLUSTER_FIXTURES:
        return "cluster"
    if fixtures & INSTALL_FIXTURES:
        return "install"
    if "amqp_url" in fixtures:
        return "stack"
    if "database_url" in fixtures:
        return "db"
    return "unit"


def shared_fixture_group(item) -> str | None:
    """The test's module name if it uses a fixture made once per module or class (its
    tests then run on one xdist worker); None if each of its fixtures is made per test
    or per process."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None or item.module is None:
        return None
    for definitions in info.name2fixturedefs.values():
        if definitions and definitions[-1].scope in ("module", "class", "package"):
            return item.module.__name__.rpartition(".")[2]
    return None
