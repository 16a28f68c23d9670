"""The web page at `/`, end to end in a real browser: Debian's Chromium driven by Selenium through
the system chromedriver, against `resmemnet serve` on a loopback port.

Needs the `chromium` and `chromium-driver` packages (`make test` installs them where apt-get is
available). Without them the browser tests skip, except where CI or RESMEMNET_REQUIRE_BROWSER is
set: there they fail, so CI can never pass without having run them.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from conftest import serve_subprocess

CHROMIUM = os.environ.get("RESMEMNET_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RESMEMNET_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRED = bool(os.environ.get("CI") or os.environ.get("RESMEMNET_REQUIRE_BROWSER"))
WAIT_S = 120
pytestmark = pytest.mark.process  # Chromium against a real `resmemnet serve`


def browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def require_browser():
    missing = browser_missing()
    if missing:
        message = f"browser test needs {missing} (apt-get install chromium chromium-driver; pip install selenium)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


# -- the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranked_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The test checkpoint with reference quantiles (0, 0.01, ..., 1), so that scores get percentiles."""
    folder = tmp_path_factory.mktemp("ranked")
    shutil.copy(tiny_checkpoint.with_suffix(".safetensors"), folder)
    meta = json.loads(tiny_checkpoint.read_text())
    meta["reference"] = {"set": "test", "n": 101, "quantiles": [i / 100 for i in range(101)]}
    path = folder / tiny_checkpoint.name
    path.write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def server(ranked_checkpoint, tmp_path_factory):
    with serve_subprocess(ranked_checkpoint, tmp_path_factory.mktemp("server"), torch_threads=1) as (base, _):
        yield base


# -- the browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(require_browser, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager must not look for drivers or browsers on the network: both are given (a driver
    # path in Service makes Selenium skip it; SE_OFFLINE keeps it offline should it run anyway).
    os.environ["SE_OFFLINE"] = "true"
    os.environ["SE_AVOID_STATS"] = "true"
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def photo(path: Path, size, sky, ground, sun, fmt="JPEG") -> Path:
    """A small made-up landscape, so that the screenshot shows something photo-like."""
    w, h = size
    img = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, int(h * 0.62), w, h], fill=ground)
    r = int(min(w, h) * 0.12)
    draw.ellipse([sun[0] * w - r, sun[1] * h - r, sun[0] * w + r, sun[1] * h + r], fill=(250, 220, 90))
    draw.polygon([(w * 0.1, h * 0.62), (w * 0.35, h * 0.25), (w * 0.6, h * 0.62)], fill=(90, 90, 110))
    img.save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    good = [photo(folder / "lake.jpg", (240, 160), (120, 170, 230), (40, 110, 60), (0.75, 0.25)),
            photo(folder / "dunes.png", (200, 200), (250, 180, 120), (200, 150, 80), (0.3, 0.2), fmt="PNG")]
    bad = folder / "notes.txt"
    bad.write_text("this is not a photo\n")
    return good, bad


def api_score(base: str, path: Path) -> dict:
    with path.open("rb") as fh:
        r = httpx.post(base + "/score", files={"file": (path.name, fh)}, timeout=60)
    r.raise_for_status()
    return r.json()


def cards(driver) -> dict:
    """name -> the card's state as the page shows it."""
    return {c["name"]: c for c in driver.execute_script("""
        return Array.from(document.querySelectorAll('#cards .card')).map(c => ({
          name: c.querySelector('.card-title').textContent,
          state: c.dataset.state, score: c.dataset.score || null, retries: c.dataset.retries || '0',
          shown: c.querySelector('.score').textContent,
          percentile: c.querySelector('.percentile').textContent,
          warnings: Array.from(c.querySelectorAll('.warnings li')).map(li => li.dataset.code),
          error: c.querySelector('.error').hidden ? '' : c.querySelector('.error-text').innerText + ' | ' +
                 c.querySelector('.error-detail').innerText,
          retry_button: c.querySelector('.retry').offsetParent !== null,
          heat: (h => h.complete ? h.naturalWidth : 0)(c.querySelector('.heat')),
          photo: (p => p.complete ? p.naturalWidth : 0)(c.querySelector('.photo')),
        }));""")}


def ordinal(value: float) -> str:
    n = round(value)
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def open_page(driver, base: str):
    driver.get(base + "/")
    wait_for(lambda: driver.execute_script(
        "return document.querySelector('#service-status').dataset.state === 'ready'"), what="the page to see the model ready")


def upload(driver, paths):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))


def settled(driver, n: int):
    return lambda: (lambda c: len(c) == n and all(x["state"] in ("done", "error") for x in c.values()) and c)(cards(driver))


# -- tests -----------------------------------------------------------------------------------
def test_page_scores_two_photos_shows_overlays_and_a_bad_files_message(browser, server, uploads, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    good, bad = uploads
    open_page(browser, server)
    # Keyboard first: one Tab from the top of the page reaches the file picker.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.execute_script("return document.activeElement.id") == "files"
    upload(browser, [*good, bad])
    shown = wait_for(settled(browser, 3), what="three photos to be scored or refused")

    for path in good:
        card = shown[path.name]
        expected = api_score(server, path)
        assert card["state"] == "done", card
        assert float(card["score"]) == pytest.approx(expected["score"], abs=1e-5)
        assert card["shown"] == f"{expected['score']:.3f}"
        assert card["percentile"] == f"· {ordinal(expected['percentile'])} percentile"
        assert card["warnings"] == list(expected.get("warnings") or [])
        assert card["heat"] == expected["width"], "the overlay PNG loaded at the photo's width"
        assert card["photo"] == expected["width"]
        assert card["error"] == ""

    refused = shown["notes.txt"]
    assert refused["state"] == "error"
    assert "Could not score notes.txt: This file is not an image the service can read." in refused["error"]
    assert "HTTP 415, not_an_image" in refused["error"]
    assert refused["heat"] == 0
    assert not refused["retry_button"], "a file the service refuses is not worth retrying"

    # The table sorts by score, both ways, keyboard only; failed photos stay last.
    rows = lambda: browser.execute_script(  # noqa: E731
        "return Array.from(document.querySelectorAll('#table tbody tr')).map(r => r.innerText.split('\\t'))")
    assert len(rows()) == 3
    sort = browser.find_element(By.ID, "sort")
    sort.send_keys(Keys.ENTER)
    scores = {p.name: float(shown[p.name]["score"]) for p in good}
    high, low = sorted(scores, key=scores.get, reverse=True)
    assert [r[0].strip() for r in rows()] == [high, low, "notes.txt"]
    assert browser.find_element(By.ID, "score-col").get_attribute("aria-sort") == "descending"
    sort.send_keys(Keys.ENTER)
    assert [r[0].strip() for r in rows()] == [low, high, "notes.txt"]

    # The slider moves the overlay's opacity, from the keyboard.
    slider = browser.find_element(By.CSS_SELECTOR, f"#cards .card[data-score] .alpha")
    slider.send_keys(Keys.END)
    card_el = slider.find_element(By.XPATH, "ancestor::li")
    assert card_el.find_element(By.CSS_SELECTOR, ".heat").value_of_css_property("opacity") == "1"
    slider.send_keys(Keys.HOME)
    assert card_el.find_element(By.CSS_SELECTOR, ".heat").value_of_css_property("opacity") == "0"
    slider.send_keys(Keys.PAGE_UP)  # back to something visible for the screenshot
    for _ in range(8):
        slider.send_keys(Keys.ARROW_RIGHT)

    # The CSV the Download button saves: a header and one row per file, in the table's order.
    download_dir = tmp_path / "downloads"
    download_dir.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    browser.find_element(By.ID, "download").click()
    saved = wait_for(lambda: [p for p in download_dir.glob("*.csv")], timeout=30, what="the CSV download")[0]
    text = saved.read_text()
    assert "\r" not in text
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["filename"] for r in table] == [low, high, "notes.txt"]
    assert float(table[0]["score"]) == pytest.approx(scores[low], abs=1e-6)
    assert table[2]["reason"] == "not_an_image" and table[2]["score"] == ""
    assert list(table[0]) == ["filename", "profile", "score", "percentile", "warnings", "width", "height", "error",
                              "reason"]
    assert {r["profile"] for r in table} == {"default"}

    shot = tmp_path / "page.png"
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 140, 4000))  # the whole page in one picture
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shot))
    browser.set_window_size(1280, 1000)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


@pytest.fixture(scope="module")
def profiled_server(profile_checkpoint, tmp_path_factory):  # noqa: F811
    with serve_subprocess(profile_checkpoint, tmp_path_factory.mktemp("profiled"), torch_threads=1) as (base, _):
        yield base


def test_a_model_with_one_profile_shows_no_selector(browser, server):
    open_page(browser, server)
    assert not browser.find_element("id", "profile-box").is_displayed()


def test_the_profile_selector_lists_the_models_profiles_and_rescores(browser, profiled_server, uploads):
    """The selector shows /readyz's profiles, default first; choosing one rescores every photo with it."""
    from selenium.webdriver.support.ui import Select

    server = profiled_server

    good, _ = uploads
    ready = httpx.get(server + "/readyz", timeout=30).json()
    names = [p["name"] for p in ready["profiles"]]
    assert names[0] == "default" and len(names) > 1, names
    open_page(browser, server)
    select = Select(browser.find_element("id", "profile"))
    assert [o.get_attribute("value") for o in select.options] == names
    assert browser.find_element("id", "profile-box").is_displayed()
    upload(browser, [good[0]])
    wait_for(settled(browser, 1), what="the photo to be scored")
    other = names[1]
    select.select_by_value(other)
    expected = httpx.post(server + "/score", params={"profile": other}, files={"file": (good[0].name, good[0].read_bytes())},
                          timeout=60).json()
    card = lambda: browser.execute_script(  # noqa: E731
        "const c = document.querySelector('#cards .card'); return [c.dataset.profile, c.dataset.state, c.dataset.score,"
        " c.querySelector('.score-label').textContent]")
    wait_for(lambda: card()[0] == other and card()[1] == "done", what=f"the photo rescored with {other}")
    profile, _, score, label = card()
    assert float(score) == pytest.approx(expected["score"], abs=1e-5)
    assert label == f"Score ({other})"
    hint = browser.find_element("id", "profile-hint").text
    assert hint == next(p["description"] for p in ready["profiles"] if p["name"] == other)
    csv_text = browser.execute_script("return window.resmemnet.toCsv()")
    assert list(csv.DictReader(io.StringIO(csv_text)))[0]["profile"] == other
    browser.find_element("id", "clear").click()
    select.select_by_value("default")


def test_a_busy_service_is_retried_with_a_message(browser, server, uploads):
    """A 503 with Retry-After (queue full) is retried after the advertised wait, and the user is told."""
    good, _ = uploads
    open_page(browser, server)
    # The first /score answer is a 503 as the service sends it when its queue is full.
    browser.execute_script("""
        const realFetch = window.fetch;
        let refused = false;
        window.busyMessages = [];
        new MutationObserver(() => document.querySelectorAll('.progress').forEach(p => {
          if (p.textContent.includes('busy')) window.busyMessages.push(p.textContent);
        })).observe(document.body, {subtree: true, childList: true, characterData: true});
        window.fetch = (url, init) => {
          if (!refused && String(url).endsWith('score')) {
            refused = true;
            return Promise.resolve(new Response(JSON.stringify({error: {status: 503, reason: 'queue_full',
              message: 'the scoring queue is full (128 images); retry shortly'}}),
              {status: 503, headers: {'Content-Type': 'application/json', 'Retry-After': '1'}}));
          }
          return realFetch(url, init);
        };""")
    upload(browser, [good[0]])
    shown = wait_for(settled(browser, 1), what="the photo to be scored after the retry")
    card = shown[good[0].name]
    assert card["state"] == "done" and card["retries"] == "1"
    assert float(card["score"]) == pytest.approx(api_score(server, good[0])["score"], abs=1e-5)
    messages = browser.execute_script("return window.busyMessages")
    assert any("The service is busy. Trying again in 1 s (attempt 1 of 5)" in m for m in messages), messages


def test_a_dropped_photo_is_scored(browser, server):
    """Drag and drop: a photo dropped on the drop zone is scored like a picked one."""
    open_page(browser, server)
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const canvas = document.createElement('canvas');
        canvas.width = 96; canvas.height = 64;
        const g = canvas.getContext('2d');
        g.fillStyle = '#3a7'; g.fillRect(0, 0, 96, 64);
        g.fillStyle = '#fc3'; g.beginPath(); g.arc(60, 20, 12, 0, 7); g.fill();
        canvas.toBlob(blob => {
          const dt = new DataTransfer();
          dt.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
          document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
          done();
        }, 'image/png');""")
    card = wait_for(settled(browser, 1), what="the dropped photo to be scored")["dropped.png"]
    assert card["state"] == "done" and 0.0 <= float(card["score"]) <= 1.0
    assert card["heat"] == 96


def test_warnings_are_shown_in_words(browser, server, tmp_path):
    """A flat grey picture is one the model cannot judge: the card says so, in words."""
    flat = tmp_path / "grey.png"
    Image.new("RGB", (160, 120), (128, 128, 128)).save(flat)
    expected = api_score(server, flat)
    assert "flat" in expected["warnings"]
    open_page(browser, server)
    upload(browser, [flat])
    card = wait_for(settled(browser, 1), what="the grey picture to be scored")["grey.png"]
    assert card["state"] == "done" and card["warnings"] == expected["warnings"]
    texts = browser.execute_script("return Array.from(document.querySelectorAll('.warnings li')).map(li => li.textContent)")
    assert any("Flat or nearly flat image" in t for t in texts), texts
    row = browser.execute_script("return document.querySelector('#table tbody tr').innerText")
    assert "flat" in row


def test_page_is_readable_at_phone_width(browser, server, uploads, tmp_path):
    good, bad = uploads
    browser.set_window_size(390, 844)
    try:
        open_page(browser, server)
        upload(browser, [good[0], bad])
        wait_for(settled(browser, 2), what="two photos")
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
        font = browser.execute_script("return parseFloat(getComputedStyle(document.body).fontSize)")
        assert font >= 16
        browser.save_screenshot(str(tmp_path / "phone.png"))
        print(f"screenshot: {tmp_path / 'phone.png'}")
    finally:
        browser.set_window_size(1280, 1000)


def test_page_loads_nothing_from_elsewhere(server):
    """The page and its assets name no other host, and the CSP header forbids loading from one."""
    html = httpx.get(server + "/", headers={"Accept": "text/html"}, timeout=30)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in html.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert refs and not [r for r in refs if re.match(r"[a-z]+://|//", r)], refs  # this server's own paths only
    for asset in ("/static/page.css", "/static/page.js"):
        r = httpx.get(server + asset, timeout=30)
        assert r.status_code == 200
        assert not re.search(r"https?://|url\(\s*['\"]?//", r.text), asset
    assert httpx.get(server + "/static/../page.py", timeout=30).status_code == 404
    missing = httpx.get(server + "/static/nothing.js", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["reason"] == "not_found"


def test_api_clients_still_get_json_at_the_root(server):
    r = httpx.get(server + "/", timeout=30)  # httpx, like curl, accepts */*
    assert r.status_code == 200 and r.json()["service"] == "resmemnet"
    assert json.loads(httpx.get(server + "/", headers={"Accept": "application/json"}, timeout=30).text)["docs"] == "/docs"


# -- API keys ----------------------------------------------------------------------------------
PAGE_KEY = "page-test-" + "k3y" * 8  # 34 characters of the key alphabet


@pytest.fixture(scope="module")
def keyed_server(ranked_checkpoint, tmp_path_factory):
    """A second server, with an API key configured: its scoring endpoints answer 401 without it."""
    with serve_subprocess(ranked_checkpoint, tmp_path_factory.mktemp("keyed"), torch_threads=1,
                          api_keys=f"page:{PAGE_KEY}") as (base, _):
        yield base


def key_form(driver) -> dict:
    return driver.execute_script("""
        const f = document.querySelector('#key-form');
        return {shown: !f.hidden, message: document.querySelector('#key-message').textContent,
                focused: document.activeElement && document.activeElement.id};""")


def test_the_page_asks_for_a_key_keeps_it_for_the_tab_and_sends_it(browser, keyed_server, uploads):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    good, _ = uploads
    open_page(browser, keyed_server)  # /readyz needs no key
    assert not key_form(browser)["shown"]
    upload(browser, [good[0]])
    form = wait_for(lambda: (lambda f: f["shown"] and f)(key_form(browser)), what="the page to ask for a key")
    assert "This service needs an API key" in form["message"] and form["focused"] == "api-key"
    assert "Waiting for an API key" in browser.execute_script("return document.querySelector('.progress').textContent")

    # a wrong key is refused, the page says so and asks again; the photo waits, it is not failed
    browser.find_element(By.ID, "api-key").send_keys("not-the-right-key-at-all" + Keys.ENTER)
    wait_for(lambda: "was not accepted" in key_form(browser)["message"] and key_form(browser)["shown"],
             what="the page to say the key was refused")
    assert cards(browser)[good[0].name]["state"] not in ("error", "done")

    browser.find_element(By.ID, "api-key").send_keys(PAGE_KEY + Keys.ENTER)
    card = wait_for(settled(browser, 1), what="the photo to be scored with the key")[good[0].name]
    with good[0].open("rb") as fh:
        r = httpx.post(keyed_server + "/score", files={"file": (good[0].name, fh)},
                       headers={"Authorization": f"Bearer {PAGE_KEY}"}, timeout=60)
    assert r.status_code == 200
    assert card["state"] == "done" and float(card["score"]) == pytest.approx(r.json()["score"], abs=1e-5)
    assert card["heat"] == r.json()["width"], "the heatmap request carried the key too"
    assert not key_form(browser)["shown"] and browser.find_element(By.ID, "api-key").get_attribute("value") == ""
    # kept for this tab only: sessionStorage, nothing in localStorage or cookies
    assert browser.execute_script("return sessionStorage.getItem('resmemnet.apiKey')") == PAGE_KEY
    assert browser.execute_script("return localStorage.length") == 0
    assert browser.execute_script("return document.cookie") == ""

    # a reload of the tab keeps it: the next photo is scored without a question
    open_page(browser, keyed_server)
    upload(browser, [good[1]])
    card = wait_for(settled(browser, 1), what="the next photo, with the kept key")[good[1].name]
    assert card["state"] == "done" and not key_form(browser)["shown"]

    # another tab is another session: it has no key
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    try:
        open_page(browser, keyed_server)
        assert browser.execute_script("return sessionStorage.getItem('resmemnet.apiKey')") is None
    finally:
        browser.close()
        browser.switch_to.window(first)
