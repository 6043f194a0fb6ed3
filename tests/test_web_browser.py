"""molteniron-web in a real browser (Debian's chromium and chromium-driver, driven by
selenium) against a real worker: pages that follow the pool without a reload, the
queue, a maintenance reason, no password anywhere in the DOM, and pages that work with
scripts off. Screenshots for the README: MOLTENIRON_SCREENSHOTS=docs/screenshots.

Every wait is for a condition, with a deadline. The browser is headless, with a
profile of its own, and quits with the module; each test stops its web process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.stack import ROOT, wait_until
from tests.web import WebProcess, add_nodes

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Where the tests save their screenshots, when asked: README's are made with
# MOLTENIRON_SCREENSHOTS=docs/screenshots (so that an ordinary run changes no file).
SCREENSHOTS = os.environ.get("MOLTENIRON_SCREENSHOTS")
DEADLINE = 15  # seconds for a change to show: a live update comes every second here


def _driver(profile: Path, scripts: bool = True):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the browser tests need Debian's "
                    "chromium and chromium-driver (apt-get install -y chromium "
                    "chromium-driver; .ci/run installs them)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--no-first-run", "--window-size=1400,900",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # chromium refuses to run as root otherwise
    if not scripts:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = _driver(tmp_path_factory.mktemp("chromium-profile"))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def site(running, tmp_path, request):
    """A worker with nodes in two pools, and molteniron-web updating every second."""
    add_nodes(running, 1, tags="x86,fast")
    add_nodes(running, 2, 3, tags="x86")
    add_nodes(running, 4, 5, pool="gpu", tags="gpu")
    web = WebProcess(running.env, tmp_path, "--refresh", "1", "--sample-every", "1")
    yield web
    web.stop()
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        print(f"--- web log ---\n{web.log()[-4000:]}")


def js(driver, script: str, *args):
    """Evaluated in the page at once: no element reference to go stale when the live part
    is replaced."""
    return driver.execute_script(script, *args)


def text(driver, selector: str) -> str | None:
    return js(driver, "const e = document.querySelector(arguments[0]);"
                      "return e === null ? null : e.textContent.trim();", selector)


def shown(driver, selector: str) -> str:
    """text() of an element that must be on the page."""
    found = text(driver, selector)
    assert found is not None, f"nothing matches {selector}"
    return found


def open_page(driver, url: str) -> None:
    """Open a page and mark its window: the mark is gone if the page is ever reloaded."""
    driver.get(url)
    js(driver, "window.moltenironMark = 'not reloaded';")


def not_reloaded(driver) -> bool:
    return js(driver, "return window.moltenironMark === 'not reloaded';")


def eventually(driver, condition, what: str, timeout: float = DEADLINE):
    return wait_until(lambda: condition(driver), timeout, what, interval=0.1)


def screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        folder = ROOT / SCREENSHOTS
        folder.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(folder / f"{name}.png")), name


def node_id(site, name: str) -> int:
    return next(n["id"] for n in site.get("/api/v1/nodes").json["nodes"] if n["name"] == name)


def test_a_node_goes_ready_to_allocated_and_shows_its_maintenance_reason_without_reload(
        running, site, browser):
    first = node_id(site, "node-1")
    open_page(browser, site.url + "/nodes")
    row = f"#node-{first}"
    assert text(browser, f"{row} td.state") == "ready"
    assert shown(browser, "#live-state").startswith("Updates every 1")  # the script runs

    assert running.cli("allocate", "job-42", "1").returncode == 0
    eventually(browser, lambda d: (text(d, f"{row} td.state"), text(d, f"{row} td.owner"))
               == ("allocated", "job-42"), "node-1 to show allocated to job-42")
    assert not_reloaded(browser)

    second = node_id(site, "node-2")
    assert running.cli("maintenance", "node-2", "on", "--reason",
                       "PSU swapped, burn-in until Friday").returncode == 0
    eventually(browser, lambda d: text(d, f"#node-{second} td.reason")
               == "PSU swapped, burn-in until Friday", "the maintenance reason to show")
    assert text(browser, f"#node-{second} td.state") == "maintenance"
    assert not_reloaded(browser)
    screenshot(browser, "nodes")

    # The overview counts the same, and follows a release without reload too.
    open_page(browser, site.url + "/")
    allocated = "#pool-default td[data-count=allocated]"
    assert text(browser, allocated) == "1"
    assert running.cli("release", "job-42").returncode == 0
    eventually(browser, lambda d: text(d, allocated) == "0"
               and text(d, "#pool-default td[data-count=ready]") == "2",
               "the overview to count the released node as ready")
    assert not_reloaded(browser)


def test_a_waiter_appears_in_the_queue_and_leaves_it_without_reload(running, site, browser):
    assert running.cli("allocate", "holder", "2", "gpu").returncode == 0
    open_page(browser, site.url + "/queue")
    assert "Nobody waits" in shown(browser, "#queue tbody")

    waiting = running.cli_start("allocate", "job-7", "1", "gpu", "--wait", "600",
                                "--priority", "5", "--tag", "gpu")
    try:
        eventually(browser, lambda d: text(d, "#queue tr[data-owner=job-7] .owner") == "job-7",
                   "job-7 to show in the queue")
        cells = js(browser, "return [...document.querySelectorAll("
                            "'#queue tr[data-owner=job-7] td')].map(c => c.textContent.trim());")
        assert cells[0] == "gpu" and cells[1] == "1"  # pool, position
        assert "tag gpu" in cells and "5" in cells  # constraints, priority
        assert not_reloaded(browser)
        # The overview's charts sample the queue: the gpu pool's depth chart draws a line.
        wait_until(lambda: site.get("/api/v1/pools").json["waiting"] == 1, DEADLINE,
                   "the summary to count the waiter")
        screenshot(browser, "queue")
        open_page(browser, site.url + "/")
        # Its top is 1 waiter (y = 10 in the SVG): the line reaches it.
        eventually(browser, lambda d: ",10.0" in (js(d, "const p = document.querySelector("
                                                        "'#charts-gpu path.line.depth');"
                                                        "return p && p.getAttribute('d');")
                                                  or ""),
                   "the gpu pool's queue chart to draw the waiter")
        screenshot(browser, "overview")
        open_page(browser, site.url + "/queue")
    finally:
        assert running.cli("release", "holder").returncode == 0
        served = waiting.result()
    assert served.returncode == 0, served
    eventually(browser, lambda d: text(d, "#queue tr[data-owner=job-7]") is None,
               "job-7 to leave the queue once served")
    assert "Nobody waits" in shown(browser, "#queue tbody") and not_reloaded(browser)


def test_no_password_anywhere_in_the_pages_and_they_work_with_scripts_off(
        running, site, browser, tmp_path):
    assert running.cli("allocate", "job-1", "2").returncode == 0
    assert running.cli("release", "job-1").returncode == 0
    assert running.cli("allocate", "job-2", "1", "gpu").returncode == 0
    pages = ("/", "/nodes", "/nodes?state=allocated", "/queue", "/history", "/workers")
    for page in pages:
        open_page(browser, site.url + page)
        eventually(browser, lambda d: text(d, "#updated"), f"{page} to render")
        dom = js(browser, "return document.documentElement.outerHTML;")
        for secret in ("secret-", "********", "ipmi_password", "guest:guest"):
            assert secret not in dom, (page, secret)
        if page == "/history":
            assert text(browser, "#history tr[data-owner=job-2] td:nth-child(3)") == ""
            assert "released" in shown(browser, "#history tr[data-owner=job-1]")
            screenshot(browser, "history")
        if page == "/workers":
            assert text(browser, "#workers tr[data-worker=test-worker-0] th") == "test-worker-0"
            assert text(browser, "#dead-letters") == "0"
            screenshot(browser, "workers")

    # Scripts off: the same pages, whole as served; the filters are a plain form.
    plain = _driver(tmp_path / "profile-no-scripts", scripts=False)
    try:
        plain.get(site.url + "/nodes?pool=gpu&state=allocated")
        assert js_free_rows(plain) == ["node-4"]
        assert "Scripts off" in plain.find_element("id", "live-state").text
        plain.find_element("name", "owner").send_keys("nobody")
        plain.find_element("css selector", "form.filters button").click()
        wait_until(lambda: "owner=nobody" in plain.current_url, DEADLINE, "the form to submit")
        assert "No node matches" in plain.find_element("id", "nodes").text
    finally:
        plain.quit()


def js_free_rows(driver) -> list[str]:
    """The node names of the nodes table, read without running a script in the page."""
    return [row.get_attribute("data-name")
            for row in driver.find_elements("css selector", "#nodes tbody tr[data-name]")]
