"""The web UI in a real browser: gunicorn serving node.faces.http in front of a 3-node cluster.

Headless Chromium (Debian `chromium` and `chromium-driver`) driven by selenium. The node has
an API token, so the browser first signs in with it (the form at /login, which sets an
HttpOnly session cookie). The test submits tasks over gRPC, then checks what a person would
see: the task in the list, the queue depth, its log in the detail view, a cancel that
really cancels, the nodes with their capacity. Screenshots land in tests/e2e/artifacts/
for people to look at.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, wait_for

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).with_name("artifacts")
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run")
# Big enough that every view fits without scrolling in the screenshots.
WINDOW = (1440, 1000)
# Page updates poll every 2-3 s; allow for a loaded machine.
UI_TIMEOUT = 30.0


def _require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.skip(f"the web UI test needs {', '.join(missing)}: "
                    "`apt-get install chromium chromium-driver`")
    pytest.importorskip("selenium", reason="the web UI test needs selenium (pip install selenium)")


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# The token the HTTP face demands (what `filch certs` writes, here made up for the test).
TOKEN = "0123456789abcdef" * 4


def _get(url: str, token: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture(scope="module")
def http_url(three_nodes: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real gunicorn with node/faces/gunicorn_conf.py, in front of the first node."""
    _require_browser()
    node = three_nodes.nodes[0]
    listen = f"127.0.0.1:{_free_port('127.0.0.1')}"
    directory = tmp_path_factory.mktemp("gunicorn")
    log_path = directory / "gunicorn.log"
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o640)
    env = dict(os.environ, FILCH_SERVER=node.address, FILCH_HTTP_LISTEN=listen,
               FILCH_TOKEN_FILE=str(token_file))
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [GUNICORN, "-c", "node/faces/gunicorn_conf.py", "node.faces.http:app"],
            cwd=REPO, env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://{listen}"
    last: list[object] = []
    try:
        def ready() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"gunicorn exited: {log_path.read_text()}")
            try:
                status, body = _get(f"{url}/readyz")
            except OSError as error:
                last[:] = [error]
                return False
            last[:] = [body]
            return status == 200
        try:
            wait_for("gunicorn to answer /readyz with 200", ready, timeout=60)
        except AssertionError as error:
            raise AssertionError(f"{error}; last answer: {last}") from None
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    access_log = log_path.read_text()
    assert "Traceback" not in access_log, access_log


@pytest.fixture(scope="module")
def browser(http_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        sign_in(driver, http_url)
        yield driver
        problems = [entry["message"] for entry in driver.get_log("browser")
                    if "Content Security Policy" in entry["message"]
                    or "Uncaught" in entry["message"]]
        assert not problems, problems
    finally:
        driver.quit()


def until(driver: Any, what: str, check: Callable[[], T | None]) -> T:
    """Wait for the page to show something; fail with what was expected and a screenshot.

    An element the page re-rendered between finding and reading it only means "not yet".
    """
    from selenium.common.exceptions import StaleElementReferenceException

    def settled() -> T | None:
        try:
            return check()
        except StaleElementReferenceException:
            return None
    try:
        return wait_for(what, settled, timeout=UI_TIMEOUT, interval=0.2)
    except AssertionError:
        driver.save_screenshot(str(ARTIFACTS / "failure.png"))
        raise


def sign_in(driver: Any, url: str) -> None:
    """What a person does first: open the UI, land on the sign-in form, paste the token."""
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/#/tasks")
    until(driver, "the sign-in form", lambda: driver.current_url == f"{url}/login"
          and driver.find_elements(By.ID, "token"))
    driver.find_element(By.ID, "token").send_keys("not-the-token")
    driver.find_element(By.ID, "signin-submit").click()
    until(driver, "the wrong token to be refused",
          lambda: "wrong token" in text_of(driver, "banner"))
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(TOKEN)
    driver.find_element(By.ID, "signin-submit").click()
    until(driver, "the UI after signing in",
          lambda: driver.current_url.startswith(f"{url}/#/tasks"))
    # The session lives in an HttpOnly cookie: no script on the page can read it.
    assert driver.execute_script("return document.cookie") == ""
    [cookie] = driver.get_cookies()
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
    assert TOKEN not in cookie["value"]


def text_of(driver: Any, element_id: str) -> str:
    """The element's text, found afresh if the page re-renders it while it is read."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(4):
        try:
            return str(driver.find_element(By.ID, element_id).text)
        except StaleElementReferenceException:
            time.sleep(0.1)
    return str(driver.find_element(By.ID, element_id).text)


def test_task_list_shows_submitted_tasks_and_the_queue_depth(
        three_nodes: Cluster, http_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    hello = three_nodes.submit("sh", "-c", "echo hello from filch", name="hello")
    failing = three_nodes.submit("sh", "-c", "echo about to fail; exit 3", name="fails")
    # 64 CPUs fit on no node: these wait in the queue, so the queue depth is 2.
    for _ in range(2):
        three_nodes.submit("true", cpu_millis=64_000, name="too-big")
    three_nodes.submit("sleep", "120", cpu_millis=500, memory_bytes=256 << 20, name="busy")
    three_nodes.wait_finished([hello, failing])

    browser.get(f"{http_url}/#/tasks")
    # The list may still show an earlier refresh (the page was open already): wait for
    # the one that shows the task finished.
    row = until(browser, "the hello task in the list, finished", lambda: (
        found := browser.find_elements(By.CSS_SELECTOR, f'tr[data-id="{hello}"]'))
        and "COMPLETE" in found[0].text and found)[0]
    assert "hello" in row.text
    pending = len(three_nodes.stub().ListTasks(
        pb.ListTasksRequest(state=pb.TASK_STATE_PENDING), timeout=10).tasks)
    assert pending == 2
    until(browser, "the queue depth to read 2", lambda: text_of(browser, "queue-depth") == "2")
    failed_row = browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{failing}"]')
    assert "exit 3" in failed_row.text
    until(browser, "the readiness pill to say ready",
          lambda: text_of(browser, "readiness-text").startswith("ready"))
    browser.save_screenshot(str(ARTIFACTS / "tasks.png"))

    # The state filter leaves only pending tasks.
    browser.find_element(By.CSS_SELECTOR, '#state-filter button[data-state="PENDING"]').click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#tasks-body tr")
    assert len(rows) == 2
    assert all("PENDING" in row.text for row in rows)


def test_task_detail_streams_the_log_while_the_task_runs(
        three_nodes: Cluster, http_url: str, browser: Any) -> None:
    script = "for i in 1 2 3 4 5 6; do echo step $i of 6; sleep 1; done; echo done"
    task_id = three_nodes.submit("sh", "-c", script, name="counter", cpu_millis=250)
    three_nodes.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
    browser.get(f"{http_url}/#/tasks/{task_id}")
    until(browser, "the first line while the task runs",
          lambda: "step 1 of 6" in text_of(browser, "task-log"))
    # Seen before the end: the log is streamed, not fetched when the task is over.
    assert "done" not in text_of(browser, "task-log").split()
    until(browser, "the last line", lambda: "done" in text_of(browser, "task-log").split())
    until(browser, "the state to become COMPLETE",
          lambda: text_of(browser, "task-state") == "COMPLETE")
    lines = text_of(browser, "task-log").splitlines()
    assert lines == [f"step {i} of 6" for i in range(1, 7)] + ["done"]
    browser.save_screenshot(str(ARTIFACTS / "task.png"))


def test_cancel_from_the_task_view(three_nodes: Cluster, http_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    task_id = three_nodes.submit("sh", "-c", "echo working; sleep 300", name="to-cancel")
    three_nodes.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
    browser.get(f"{http_url}/#/tasks/{task_id}")
    def cancel_button() -> Any:
        # Looked up afresh each time: the page re-renders while it refreshes.
        return until(browser, "the cancel button", lambda: (
            found := browser.find_element(By.ID, "task-cancel")).is_displayed() and found)

    cancel_button()
    until(browser, "the log so far", lambda: "working" in text_of(browser, "task-log"))
    assert text_of(browser, "log-status") == "following"
    browser.save_screenshot(str(ARTIFACTS / "task-running.png"))
    cancel_button().click()
    until(browser, "the confirmation", lambda: cancel_button().text == "Click again to cancel")
    assert three_nodes.get(task_id).state == pb.TASK_STATE_RUNNING  # one click does nothing
    cancel_button().click()
    task = three_nodes.wait_state(task_id, (pb.TASK_STATE_CANCELED,))
    assert task.reason == pb.REASON_CANCELED
    until(browser, "the page to show CANCELED",
          lambda: text_of(browser, "task-state") == "CANCELED")
    assert not browser.find_element(By.ID, "task-cancel").is_displayed()


def test_nodes_view_shows_capacity_allocation_and_the_leader(
        three_nodes: Cluster, http_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    for _ in range(3):
        three_nodes.submit("sleep", "120", cpu_millis=700, memory_bytes=1 << 30, name="load")
    wait_for("the load to be allocated", lambda: sum(
        node.cpu_allocated_millis for node in three_nodes.list_nodes()) >= 2600)
    browser.get(f"{http_url}/#/nodes")
    cards = until(browser, "three node cards", lambda: (
        found := browser.find_elements(By.CSS_SELECTOR, "#nodes-grid .node")) and
        len(found) == 3 and found)
    assert sorted(card.get_attribute("data-node") for card in cards) == \
        sorted(node.name for node in three_nodes.nodes)
    leaders = [card for card in cards if "etcd leader" in card.text]
    assert len(leaders) == 1
    leader = next(node for node in three_nodes.list_nodes() if node.etcd_leader)
    assert leaders[0].get_attribute("data-node") == leader.name
    assert all("/ 2 cores" in card.text for card in cards)
    # "2.6 / 6" once loaded; "0 / 6" or the placeholder dash before.
    until(browser, "the allocation to show",
          lambda: text_of(browser, "nodes-cpu").split(" / ")[0] not in ("0", "\u2013"))
    browser.save_screenshot(str(ARTIFACTS / "nodes.png"))


# User input that would run if the page ever used it as HTML (CSP blocks inline script
# anyway; the test checks that it is not even parsed: no element, the text shown as typed).
HOSTILE = """<img src=x onerror="alert(1)"><script>alert('x')</script> "quoted" & 'single'"""


def test_task_detail_shows_owner_priority_and_dependencies(
        three_nodes: Cluster, http_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    parent = three_nodes.submit("sh", "-c", "echo parent", name=HOSTILE)
    child = three_nodes.submit(
        "true", name="child", owner="ui-owner", priority=7, time_limit_seconds=90,
        retries=2, retry_on=["failed"],
        after=[pb.Dependency(id=parent, kind=pb.DEPENDENCY_KIND_ANY)])
    three_nodes.wait_finished([parent, child])

    browser.get(f"{http_url}/#/tasks")
    # An earlier test left the list filtered to pending tasks.
    until(browser, "the state filter", lambda: browser.find_element(
        By.CSS_SELECTOR, '#state-filter button[data-state=""]')).click()
    row = until(browser, "the child in the list",
                lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-id="{child}"]'))[0]
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert ["7", "ui-owner"] == cells[7:9], cells
    hostile_row = browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{parent}"]')
    assert hostile_row.find_element(By.CSS_SELECTOR, "td.name").get_attribute("title") == HOSTILE
    assert not hostile_row.find_elements(By.CSS_SELECTOR, "img, script")

    browser.get(f"{http_url}/#/tasks/{child}")

    def field(label: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, f'[data-field="{label}"] dd').text)

    until(browser, "the child's fields", lambda: browser.find_elements(
        By.CSS_SELECTOR, '[data-field="After"]'))
    assert (field("Owner"), field("Priority"), field("Time limit")) == ("ui-owner", "7", "1m30s")
    assert field("Retries").startswith("0 of 2 used · on failed")
    link = browser.find_element(By.CSS_SELECTOR, f'[data-parent="{parent}"] a')
    assert "any" in field("After")
    link.click()
    until(browser, "the parent's page", lambda: text_of(browser, "task-id") == parent)
    until(browser, "the parent's name, as typed", lambda: text_of(browser, "task-title") == HOSTILE)
    assert not browser.find_elements(By.CSS_SELECTOR, "#task-title *")
    browser.save_screenshot(str(ARTIFACTS / "task-batch.png"))


def test_an_arrays_page_lists_its_tasks_only(three_nodes: Cluster, http_url: str,
                                            browser: Any) -> None:
    from selenium.webdriver.common.by import By

    response = three_nodes.stub().Submit(pb.SubmitRequest(
        spec=pb.TaskSpec(command="true", name="array-member"),
        array=pb.ArraySpec(start=1, end=3)), timeout=10)
    assert len(response.task_ids) == 3, response
    three_nodes.wait_finished(list(response.task_ids))
    browser.get(f"{http_url}/#/tasks/{response.task_ids[1]}")
    until(browser, "the link to the task's array", lambda: browser.find_elements(
        By.CSS_SELECTOR, '[data-field="Array"] a'))[0].click()
    until(browser, "the array's page", lambda: text_of(browser, "array-filter-id")
          == response.array_id)
    browser.find_element(By.CSS_SELECTOR, '#state-filter button[data-state=""]').click()
    until(browser, "exactly the array's tasks", lambda: sorted(
        row.get_attribute("data-id") for row in browser.find_elements(
            By.CSS_SELECTOR, "#tasks-body tr")) == sorted(response.task_ids))


def test_cancel_from_an_arrays_page(three_nodes: Cluster, http_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    # A core each: on the loaded cluster some run and the rest wait; all are unfinished.
    response = three_nodes.stub().Submit(pb.SubmitRequest(
        spec=pb.TaskSpec(command="sleep", args=["300"], name="array-to-cancel",
                         cpu_millis=1000),
        array=pb.ArraySpec(start=1, end=5)), timeout=10)
    array_id = response.array_id

    def states() -> list[str]:
        """The array's task states, as the JSON API (not the page) reports them."""
        status, body = _get(f"{http_url}/api/v1/tasks?array_id={array_id}&page_size=1000",
                            TOKEN)
        assert status == 200, body
        return sorted(task["state"] for task in body["tasks"])

    def cancel_button() -> Any:
        # Looked up afresh each time: the page re-renders while it refreshes.
        return until(browser, "the cancel-array button", lambda: (
            found := browser.find_element(By.ID, "array-cancel")).is_displayed() and found)

    browser.get(f"{http_url}/#/arrays/{array_id}")
    until(browser, "the array's page", lambda: text_of(browser, "array-filter-id") == array_id)
    cancel_button().click()
    until(browser, "the confirmation", lambda: cancel_button().text == "Click again to cancel")
    # One click does nothing.
    assert set(states()) <= {"PENDING", "RUNNING"} and len(states()) == 5, states()
    cancel_button().click()
    until(browser, "the count of canceled tasks",
          lambda: text_of(browser, "array-cancel-result") == "5 tasks canceled")
    wait_for("every task of the array to be canceled", lambda: states() == ["CANCELED"] * 5)
    until(browser, "the refreshed array view", lambda: text_of(browser, "count-canceled") == "5")
    # Nothing left to cancel: the button goes.
    until(browser, "the button to hide",
          lambda: not browser.find_element(By.ID, "array-cancel").is_displayed())
    browser.save_screenshot(str(ARTIFACTS / "array-canceled.png"))


def test_a_retried_tasks_page_shows_every_attempt(three_nodes: Cluster, http_url: str,
                                                 browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    script = 'echo "attempt $FILCH_ATTEMPT"; [ "$FILCH_ATTEMPT" -ge 3 ]'
    task_id = three_nodes.submit("sh", "-c", script, name="flaky", retries=3,
                                 retry_on=["failed"], retry_backoff_seconds=0.1)
    task = three_nodes.wait_finished([task_id])[0]
    assert (task.attempt, task.exit_code) == (3, 0)
    browser.get(f"{http_url}/#/tasks/{task_id}")

    def attempt_rows() -> list[list[str]]:
        return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                for row in browser.find_elements(By.CSS_SELECTOR, "#attempts-body tr")]
    rows = until(browser, "three attempts", lambda: len(found := attempt_rows()) == 3 and found)
    assert [(row[0], row[4], row[5]) for row in rows] == [
        ("1", "1", "EXITED"), ("2", "1", "EXITED"), ("3", "0", "EXITED")]
    names = {node.name for node in three_nodes.nodes}
    assert all(row[1] in names for row in rows), rows
    until(browser, "the retries field", lambda: browser.find_element(
        By.CSS_SELECTOR, '[data-field="Retries"] dd').text.startswith("2 of 3 used"))
    # The log of any attempt, picked in the page.
    Select(browser.find_element(By.ID, "attempt-select")).select_by_value("1")
    until(browser, "attempt 1's log", lambda: text_of(browser, "task-log") == "attempt 1")


def test_attempt_history_hold_and_array_render_as_text(http_url: str, browser: Any) -> None:
    """The page draws whatever the JSON API says: a record with a retry history, a hold
    and an array, given to the page's renderer directly (for an id no task has, so the
    page's own polling, which gets a 404, never draws over it)."""
    from selenium.webdriver.common.by import By

    unknown = "01a21bce-b194-7000-994b-fef8376138b8"
    array = "01a21bce-b194-7000-994b-fef837613800"
    attempt = {"node_id": "9" * 32, "node_name": "node-x", "started_at": "2026-01-01T00:00:00.000Z",
               "finished_at": "2026-01-01T00:00:05.000Z", "exit_code": 1, "reason": "EXITED",
               "message": HOSTILE}
    task = {
        "id": unknown, "name": HOSTILE, "state": "PENDING", "reason": "", "exit_code": None,
        "message": "retrying in 4s", "command": "sh", "args": ["-c", HOSTILE], "cpu": 0.1,
        "memory_bytes": 128 << 20, "restart": True, "attempt": 2, "node_id": "9" * 32,
        "node_address": "", "submitted_at": None, "started_at": None, "finished_at": None,
        "array_id": array, "array_index": 4, "after": [], "hold": "RETRY",
        "not_before": "2026-01-01T00:00:12.000Z", "time_limit_seconds": 0, "retries": 3,
        "retry_on": ["failed", "oom"], "retry_backoff_seconds": 2, "retries_used": 2,
        "priority": -3, "owner": HOSTILE,
        "attempts": [{**attempt, "attempt": 1}, {**attempt, "attempt": 2, "exit_code": None,
                                                   "reason": "TIMED_OUT", "message": ""}]}
    browser.get(f"{http_url}/#/tasks/{unknown}")
    until(browser, "the page to find no such task",
          lambda: "No task" in text_of(browser, "banner"))
    browser.execute_script("renderTask(arguments[0])", task)
    rows = browser.find_elements(By.CSS_SELECTOR, "#attempts-body tr")
    assert browser.find_element(By.ID, "attempts-card").is_displayed()
    times = [attempt["started_at"], attempt["finished_at"]]
    assert [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows] == [
        ["1", "node-x", *times, "1", "EXITED", HOSTILE],
        ["2", "node-x", *times, "\u2013", "TIMED_OUT", "\u2013"]]
    fields = {element.find_element(By.TAG_NAME, "dt").get_attribute("textContent"):
              element.find_element(By.TAG_NAME, "dd").text
              for element in browser.find_elements(By.CSS_SELECTOR, "#task-fields > div")}
    assert fields["Owner"] == HOSTILE
    assert fields["Held"] == "retry until 2026-01-01T00:00:12.000Z"
    assert fields["Retries"] == "2 of 3 used · on failed, oom · back-off from 2s"
    assert fields["Array"] == f"{array} · index 4"
    assert browser.find_element(By.CSS_SELECTOR, '[data-field="Array"] a').get_attribute(
        "href").endswith(f"#/arrays/{array}")
    assert not browser.find_elements(By.CSS_SELECTOR, "#view-task img, #view-task script")
    browser.save_screenshot(str(ARTIFACTS / "task-attempts.png"))


def test_json_api_through_gunicorn(three_nodes: Cluster, http_url: str) -> None:
    """The same app behind the real server: probes open, the API behind the token."""
    assert _get(f"{http_url}/healthz") == (200, {"status": "ok"})
    assert _get(f"{http_url}/api/v1/nodes")[0] == 401
    status, body = _get(f"{http_url}/api/v1/tasks/01a21bce-b194-7000-994b-fef8376138b8",
                        TOKEN)
    assert status == 404
    assert "no task" in body["error"]
    status, body = _get(f"{http_url}/api/v1/nodes", TOKEN)
    assert (status, len(body["nodes"])) == (200, 3)


def test_sign_out_sends_the_browser_back_to_the_sign_in_form(http_url: str, browser: Any
                                                             ) -> None:
    """Last: it ends the browser's session."""
    from selenium.webdriver.common.by import By

    browser.get(f"{http_url}/#/nodes")
    until(browser, "the sign-out button", lambda: browser.find_element(By.ID, "sign-out")
          .is_displayed())
    browser.find_element(By.ID, "sign-out").click()
    until(browser, "the sign-in form", lambda: browser.current_url == f"{http_url}/login")
    assert browser.get_cookies() == []
    browser.get(f"{http_url}/#/tasks")
    until(browser, "the sign-in form again", lambda: browser.current_url == f"{http_url}/login")

