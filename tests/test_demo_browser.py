"""demo.py's page in headless Chromium (selenium + chromium-driver): pick a source with the keyboard, type a text,
press Enter, see k results; choose a result and search again: a second turn on the trail. Filtering the gallery,
uploading a source and a phone-width window are driven too. Skips with one line when no browser can be had.

``DEMO_SCREENSHOT=PATH`` saves a picture of the page with its results grid there (docs/demo.png is one)."""
from __future__ import annotations

import os
import shutil
import socket
import threading

import pytest
import torch

flask = pytest.importorskip("flask", reason="the demo's extra is not installed (pip install -r requirements-demo.txt)")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements-demo.txt)")

import demo  # noqa: E402  (needs flask)
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

QUERY = "images/blue clock/000.jpg"
WAIT_S = 60


def find_browser() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths; skips the module when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def server(tmp_path_factory, triplets_run, triplets_data, gallery_tools):
    """demo.py's application on 127.0.0.1 and a free port, in a thread: ``(base url, state)``."""
    folder = gallery_tools.copy_test_split(triplets_data, str(tmp_path_factory.mktemp("browser_gallery")))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with socket.socket() as probe:  # build_state checks that --port can be listened on: give it a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = demo.build_state(demo.get_args_parser().parse_args([
        "--model_checkpoint", triplets_run["ckpt"], "--gallery", folder, "--device", "cpu", "--port", str(port)]))
    httpd = make_server("127.0.0.1", 0, demo.create_app(state), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/", state, folder
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1100", "--hide-scrollbars"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    except WebDriverException as exc:
        pytest.skip(f"headless chromium does not start: {str(exc.msg or exc).splitlines()[0]}")
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def paths(driver, grid: str) -> list[str]:
    """The data-path of every button of the grid ``grid`` (read in one script: the grid may be replaced meanwhile)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' button')].map(b => b.dataset.path);", grid)


def result_paths(driver) -> list[str]:
    return paths(driver, "#results")


def wait_for(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message=f"waiting for {what}")


def images_loaded(driver, selector: str) -> bool:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].every(i => i.complete && i.naturalWidth > 0);",
        selector)


def test_two_turns_in_the_browser(server, browser):
    base, state, folder = server
    driver = browser
    driver.get(base)
    assert driver.find_element(By.TAG_NAME, "h1").text == "Composed image retrieval"
    wait_for(driver, lambda d: images_loaded(d, "#gallery-grid img"), "the gallery thumbnails")

    # keyboard: Enter on a gallery tile picks it and moves the focus to the text; Enter there submits
    tile = driver.find_element(By.CSS_SELECTOR, f'#gallery-grid button[data-path="{QUERY}"]')
    tile.send_keys(Keys.ENTER)
    assert driver.find_element(By.ID, "source-name").text == f"Source: {QUERY}"
    assert driver.switch_to.active_element.get_attribute("id") == "text"
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys("4")
    driver.find_element(By.ID, "text").send_keys("green", Keys.ENTER)
    wait_for(driver, lambda d: len(result_paths(d)) == 4, "4 results")
    first = result_paths(driver)
    assert first == [p for p, _ in demo._search(state, os.path.join(folder, QUERY), "green", 4)]
    wait_for(driver, lambda d: images_loaded(d, "#results img"), "the result images")
    alts = [i.get_attribute("alt") for i in driver.find_elements(By.CSS_SELECTOR, "#results img")]
    assert alts == first
    assert driver.find_element(By.ID, "query-caption").text == f"Turn 1: {QUERY} + \u201cgreen\u201d"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#trail li")) == 1

    # a result clicked becomes the next source: a second turn
    driver.find_elements(By.CSS_SELECTOR, "#results button")[0].click()
    assert driver.find_element(By.ID, "source-name").text == f"Source: {first[0]}"
    driver.find_element(By.ID, "text").send_keys("replace green with red", Keys.ENTER)
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#trail li")) == 2, "the second turn")
    wait_for(driver, lambda d: len(result_paths(d)) == 4 and first[0] not in result_paths(d), "turn 2's results")
    second = result_paths(driver)
    assert second == [p for p, _ in demo._search(state, os.path.join(folder, first[0]), "replace green with red", 4)]
    assert driver.find_element(By.ID, "query-caption").text.startswith("Turn 2: ")
    wait_for(driver, lambda d: images_loaded(d, "#results img, #trail img"), "turn 2's images")
    if os.environ.get("DEMO_SCREENSHOT"):  # the whole page, trail included
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(1200, height + 160)
        driver.save_screenshot(os.environ["DEMO_SCREENSHOT"])
        driver.set_window_size(1200, 1100)

    # the trail shows an earlier turn again
    assert driver.find_elements(By.CSS_SELECTOR, "#trail button")[1].get_attribute("aria-current") == "true"
    driver.find_elements(By.CSS_SELECTOR, "#trail button")[0].click()
    assert result_paths(driver) == first
    marked = [b.get_attribute("aria-current") for b in driver.find_elements(By.CSS_SELECTOR, "#trail button")]
    assert marked == ["true", None]
    assert driver.find_element(By.ID, "query-caption").text.startswith("Turn 1: ")


def test_filter_upload_and_phone_width(server, browser):
    base, state, folder = server
    driver = browser
    driver.get(base)
    box = driver.find_element(By.ID, "filter")
    box.send_keys("plate", Keys.ENTER)
    wait_for(driver, lambda d: "page 1 of 1" in d.find_element(By.ID, "gallery-count").text
             and all("plate" in p for p in paths(d, "#gallery-grid")), "the filtered gallery")
    shown = paths(driver, "#gallery-grid")
    assert shown == [p for p in state.files if "plate" in p] and shown

    driver.find_element(By.ID, "upload").send_keys(os.path.join(folder, QUERY))
    assert driver.find_element(By.ID, "source-name").text == "Source: 000.jpg (uploaded)"
    driver.find_element(By.ID, "text").send_keys("green", Keys.ENTER)
    wait_for(driver, lambda d: len(result_paths(d)) == 10, "10 results of the upload")
    assert QUERY in result_paths(driver)  # an upload is no gallery file: its own picture may be found

    driver.set_window_size(390, 844)  # a phone
    try:
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
        assert overflow <= 0
        columns = driver.execute_script(
            "return getComputedStyle(document.querySelector('main')).gridTemplateColumns.split(' ').length;")
        assert columns == 1
    finally:
        driver.set_window_size(1200, 1100)
