"""The page at /ui in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium; nothing is downloaded) against a real uvicorn process on the tiny artefacts: type a
user id, see the list with names, post an event through the page, see the list change.

The screenshot goes to ``$MUSICREC_UI_SCREENSHOT`` when set (the README's ``docs/ui.png`` is
made with ``MUSICREC_UI_SCREENSHOT=docs/ui.png``), else into the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from recommendation_service import offline_heard
from tests.service_support import Service, tiny_artefacts

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 15  # seconds for the page to show an answer (a few ms each, on a busy machine)


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    driver = shutil.which("chromedriver") or (CHROMEDRIVER if Path(CHROMEDRIVER).exists() else None)
    if chromium is None or driver is None:
        pytest.fail(
            "the browser test needs Debian's packages chromium and chromium-driver: "
            "apt-get install -y chromium chromium-driver (./run_tests.sh does it as root)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("ui")
    # the whole set, served form included: the ALS files tell what a user heard offline
    parquet = base / "parquet"
    shutil.copytree(tiny_artefacts(), parquet, ignore=shutil.ignore_patterns("work", "*.db*"))
    with Service(
        parquet,
        base / "history.db",
        base / "service.log",
        MUSICREC_METRICS_DIR=str(base / "metrics"),
    ) as svc:
        svc.start()
        yield svc


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,700",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _list(browser: webdriver.Chrome, element_id: str) -> list[tuple[int, str]]:
    """(track id, name) of each item of a list on the page, read in one script (the page
    may redraw the list between two element look-ups)."""
    rows = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map("
        "li => [Number(li.dataset.trackId), li.querySelector('.name').textContent])",
        f"#{element_id} li[data-track-id]",
    )
    return [(int(track), name) for track, name in rows]


def _click(browser: webdriver.Chrome, selector: str) -> None:
    """Click the first element of ``selector``, looked up again if the page redrew it
    between the look-up and the click."""

    def click() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
        except StaleElementReferenceException:
            return False
        return True

    _wait(browser, click, f"a click on {selector}")


def _wait(browser: webdriver.Chrome, condition, what: str):  # noqa: ANN001, ANN202
    try:
        return WebDriverWait(browser, WAIT, poll_frequency=0.05).until(lambda _: condition())
    except TimeoutException:
        error = browser.find_element(By.ID, "error").text
        raise AssertionError(
            f"the page did not show {what} within {WAIT} s (error line: {error!r})"
        ) from None


def test_the_page_shows_a_users_list_and_follows_an_event(
    service: Service, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    user = requests.get(service.url + "/users?limit=3", timeout=5).json()["users"][1]
    browser.get(service.url + "/ui")
    field = browser.find_element(By.ID, "user-input")
    field.send_keys(str(user), Keys.ENTER)

    shown = _wait(browser, lambda: _list(browser, "recs"), "the list")
    expected = requests.get(
        f"{service.url}/recommendations/{user}", params={"k": 10, "details": "true"}, timeout=5
    ).json()
    # the page shows the service's list, in order, with the catalogue's names
    assert [t for t, _ in shown] == [item["track_id"] for item in expected]
    assert [name for _, name in shown] == [item["name"] for item in expected]
    assert all(name for _, name in shown)
    assert browser.find_element(By.ID, "source").text == "personal"
    assert "Nightly list: 100 tracks" in browser.find_element(By.ID, "summary").text

    # one click on "listen" posts the first track as an online event: the list changes (a
    # heard track is never recommended), the history and the source show it
    first = shown[0][0]
    _click(browser, "#recs li[data-track-id] .listen")
    after = _wait(
        browser,
        lambda: (lambda now: now if now and now[0][0] != first else None)(_list(browser, "recs")),
        "a changed list",
    )
    assert first not in [t for t, _ in after]
    assert [t for t, _ in _list(browser, "history")] == [first]
    assert requests.get(f"{service.url}/history/{user}", timeout=5).json() == [first]
    source = requests.get(
        f"{service.url}/recommendations/{user}", params={"k": 10}, timeout=5
    ).headers["x-recommendation-source"]
    assert browser.find_element(By.ID, "source").text == source != "personal"
    assert browser.find_elements(By.CSS_SELECTOR, "#recs li.new"), "new tracks are marked"
    # reasons, when the service gives them (?details=true), are on the page with the names of
    # the user's tracks they name
    detailed = requests.get(
        f"{service.url}/recommendations/{user}", params={"k": 10, "details": "true"}, timeout=5
    ).json()
    reasons = browser.execute_script(
        "return [...document.querySelectorAll('#recs li[data-track-id]')].map("
        "li => (li.querySelector('.reason') || {}).textContent || null)"
    )
    first_name = shown[0][1]
    for item, shown_reason in zip(detailed, reasons, strict=True):
        reason = item.get("reason")
        if reason is None:
            assert shown_reason is None
            continue
        assert shown_reason.startswith(reason["source"])
        if first in reason.get("because", []):
            assert f"because you listened to {first_name}" in shown_reason

    # k and blend switch the list
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5", Keys.TAB)
    _wait(browser, lambda: len(_list(browser, "recs")) == 5, "five tracks")
    Select(browser.find_element(By.ID, "blend")).select_by_value("probability")
    probability = requests.get(
        f"{service.url}/recommendations/{user}", params={"k": 5, "blend": "probability"}, timeout=5
    ).json()
    _wait(
        browser,
        lambda: [t for t, _ in _list(browser, "recs")] == probability,
        "the probability blend",
    )

    # a click on a name shows that track's similar tracks
    track = _list(browser, "recs")[0]
    _click(browser, "#recs li[data-track-id] .name")
    similar = requests.get(
        f"{service.url}/similar/10", params={"track_id": track[0]}, timeout=5
    ).json()
    _wait(
        browser, lambda: [t for t, _ in _list(browser, "similar")] == similar, "the similar tracks"
    )
    assert browser.find_element(By.ID, "similar-to").text == track[1]
    assert browser.find_element(By.ID, "error").text == ""

    shot = Path(os.environ.get("MUSICREC_UI_SCREENSHOT") or tmp_path / "ui.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_a_bad_user_id_is_named_on_the_page(service: Service, browser: webdriver.Chrome) -> None:
    browser.get(service.url + "/ui")
    browser.find_element(By.ID, "user-input").send_keys("x7", Keys.ENTER)
    _wait(browser, lambda: browser.find_element(By.ID, "error").text, "an error")
    assert "whole number" in browser.find_element(By.ID, "error").text
    assert _list(browser, "recs") == []


def test_the_pages_endpoints(service: Service) -> None:
    """What the page reads besides the list endpoints: /ui itself, /users, /users/{id},
    /tracks."""
    page = requests.get(service.url + "/ui", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="recs"' in page.text and "http" not in page.text.split("<script>")[1].lower()
    users = requests.get(service.url + "/users?limit=4", timeout=5).json()
    assert len(users["users"]) == 4 and users["users_with_list"] >= 4
    user = users["users"][2]
    summary = requests.get(f"{service.url}/users/{user}?n=3", timeout=5).json()
    offline = requests.get(f"{service.url}/recommendations/{user}?k=3", timeout=5).json()
    assert summary["offline_list"]["length"] == 100
    assert [t["track_id"] for t in summary["offline_list"]["tracks"]] == offline
    assert all(t["name"] for t in summary["offline_list"]["tracks"])
    assert summary["online_history"] == {"length": 0, "total": 0, "recent": []}
    heard = summary["offline_history"]  # None only for a set without the served ALS files
    assert heard is None or (
        heard["distinct_tracks"] > 0 and all(t["name"] for t in heard["tracks"])
    )
    popular = requests.get(service.url + "/top_popular/4", timeout=5).json()
    requests.post(f"{service.url}/history/{user}", json=popular, timeout=5).raise_for_status()
    summary = requests.get(f"{service.url}/users/{user}?n=3", timeout=5).json()
    assert summary["online_history"]["length"] == 4
    assert [t["track_id"] for t in summary["online_history"]["recent"]] == popular[::-1][:3]
    named = requests.get(
        service.url + "/tracks", params={"track_id": popular[:2]}, timeout=5
    ).json()
    assert [t["track_id"] for t in named] == popular[:2] and all(t["name"] for t in named)
    assert requests.get(service.url + "/tracks", timeout=5).status_code == 422
    assert requests.get(service.url + "/users/-1", timeout=5).status_code == 422


def test_offline_heard_reads_the_users_rows_of_the_als_files() -> None:
    model = SimpleNamespace(
        user_ids=np.array([3, 8, 20], dtype=np.int32),
        heard_offsets=np.array([0, 2, 2, 5], dtype=np.int64),
        heard_rows=np.array([1, 0, 2, 1, 0], dtype=np.int32),
        track_ids=np.array([100, 200, 300], dtype=np.int32),
    )
    art = SimpleNamespace(foldin=model)
    assert offline_heard(art, 3) == [200, 100]
    assert offline_heard(art, 8) == []  # in the model, heard nothing
    assert offline_heard(art, 20) == [300, 200, 100]
    assert offline_heard(art, 5) == [] and offline_heard(art, 99) == []  # not in the model
    assert offline_heard(SimpleNamespace(foldin=None), 3) is None  # a set without ALS files
