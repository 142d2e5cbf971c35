"""The upload page in real headless Chromium, against the embedded server's REST API.

The page is served at /ui of the server's own REST port (``--web_ui_model`` names the model it asks).
"""

from __future__ import annotations

import base64
import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest

from carclf.clients import connect
from carclf.clients.web.app import PageSettings, page_file
from tests.ensemble.servers import rest_url

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MODEL = "tiny_ensemble"


def test_page_files_are_rendered_with_their_settings():
    body, content_type = page_file("", PageSettings(base="/ui", model='m"<x>', max_bytes=1234, top_k=3))
    html = body.decode()
    assert content_type.startswith("text/html") and 'data-max-bytes="1234"' in html
    assert 'data-model="m&quot;&lt;x&gt;"' in html and 'src="/ui/app.js"' in html and "{{" not in html
    assert page_file("../../etc/passwd") is None and page_file("app.js")[1].startswith("text/javascript")


def test_the_server_mounts_the_page_on_its_rest_port(tiny_ensemble_server):
    with urllib.request.urlopen(f"{rest_url(tiny_ensemble_server)}/ui", timeout=5) as response:
        html = response.read().decode()
    assert response.status == 200 and 'data-model="tiny_ensemble"' in html
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{rest_url(tiny_ensemble_server)}/ui/../../etc/passwd", timeout=5)
    assert err.value.code == 404


@pytest.fixture(scope="module")
def page_url(tiny_ensemble_server):
    """The embedded server's REST port: /ui is the page (mounted by the server), /v1 the API."""
    return rest_url(tiny_ensemble_server)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(browser, page_url):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{page_url}/ui")
    WebDriverWait(browser, 30).until(lambda d: "AVAILABLE" in d.find_element("id", "model-status").text)


def _wait_for(browser, element_id: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda d: d.find_element("id", element_id).is_displayed())
    return browser.find_element("id", element_id)


def test_an_ensemble_that_lacks_its_members_shows_why_on_the_page(browser, tiny_repository_template, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.ensemble.servers import embedded_server, write_ensemble_config

    config = write_ensemble_config(tmp_path, name="strict", failure_policy="fail")  # needs tiny_a and tiny_b
    with embedded_server(tiny_repository_template, tmp_path / "server", models=("tiny_a",), ensembles=[config],
                         web_ui_model="strict") as server:
        browser.get(f"{rest_url(server)}/ui")
        WebDriverWait(browser, 30).until(lambda d: "END" in d.find_element("id", "model-status").text)
        shown = browser.find_element("id", "model-status").text
    assert shown.startswith("strict: v1 END (model strict needs 2 of its 2 members AVAILABLE on this server")
    assert "tiny_b (not in the model config)" in shown


def test_upload_shows_top_models_votes_versions_and_latency(browser, page_url, tiny_ensemble_server, photos):
    photo = photos[0]
    with connect(rest_url(tiny_ensemble_server)) as client:
        want = client.predict(MODEL, images=[photo.read_bytes()])
    _open(browser, page_url)
    assert f"{MODEL}: v1 AVAILABLE" in browser.find_element("id", "model-status").text
    assert not browser.find_element("id", "preview").is_displayed()  # no empty image frame before an upload
    browser.find_element("id", "file").send_keys(str(photo))
    result = _wait_for(browser, "result")
    items = result.find_elements("css selector", "#top li")
    shown = [(i.find_element("class name", "label").text, i.find_element("class name", "probability").text)
             for i in items]
    assert shown == [(name, f"{100 * p:.1f} %") for name, p in want.top_k(3)[0]]
    rows = [[td.text for td in tr.find_elements("tag name", "td")]
            for tr in result.find_elements("css selector", "#members tbody tr")]
    out = want.outputs
    assert [r[:3] for r in rows] == [[str(out["member_names"][0][j]), f"v{out['member_versions'][0][j]}",
                                      str(out["member_labels"][0][j])] for j in range(2)]
    assert all(r[4].endswith(" ms") for r in rows)
    assert "answered in" in browser.find_element("id", "summary").text
    assert not browser.find_element("id", "error").is_displayed()
    assert not browser.find_element("id", "degraded").is_displayed()


def test_drag_and_drop(browser, page_url, photos):
    _open(browser, page_url)
    data = base64.b64encode(photos[1].read_bytes()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, data)
    result = _wait_for(browser, "result")
    assert len(result.find_elements("css selector", "#top li")) == 3


def test_several_files_dropped_at_once_classify_the_first_photo_and_say_so(browser, page_url, photos):
    """A text file and two photos dropped together: the first photo is classified (not the text file refused
    with the photos silently dropped), and a note names it and how many files came."""
    _open(browser, page_url)
    data = base64.b64encode(photos[1].read_bytes()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File(["not a photo"], "notes.txt", {type: "text/plain"}));
        transfer.items.add(new File([bytes], "first.jpg", {type: "image/jpeg"}));
        transfer.items.add(new File([bytes], "second.jpg", {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, data)
    result = _wait_for(browser, "result")
    assert len(result.find_elements("css selector", "#top li")) == 3
    assert browser.find_element("id", "error").get_attribute("hidden") is not None
    note = browser.find_element("id", "note")
    assert note.text == "3 files dropped: classifying first.jpg (one photo at a time)"


def test_non_image_and_oversized_uploads_get_clear_messages(browser, page_url, tmp_path):
    _open(browser, page_url)
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    browser.find_element("id", "file").send_keys(str(text))
    error = _wait_for(browser, "error")
    assert error.text == "notes.txt is not an image (text/plain): choose a JPEG, PNG, GIF, BMP or WebP photo."

    fake = tmp_path / "fake.jpg"  # the browser believes the name; the server reads the bytes
    fake.write_text("not a photo either")
    _open(browser, page_url)
    browser.find_element("id", "file").send_keys(str(fake))
    error = _wait_for(browser, "error")
    assert error.text.startswith("fake.jpg was refused: ") and "not a recognised image" in error.text
    assert not browser.find_element("id", "result").is_displayed()

    big = tmp_path / "huge.jpg"
    with big.open("wb") as fh:  # sparse: 25 MB without writing them
        fh.truncate(25 * 1024 * 1024)
    _open(browser, page_url)
    browser.find_element("id", "file").send_keys(str(big))
    error = _wait_for(browser, "error")
    limit = json.loads(browser.find_element("tag name", "body").get_attribute("data-max-bytes"))
    assert error.text == (f"huge.jpg is 25.0 MB, larger than the {limit / 1048576:.1f} MB limit: "
                          "choose a smaller photo.")


# Wraps the page's fetch: counts :predict calls and, when asked, holds the first answer back for a while,
# then says (window.__firstSettled) once the page has had time to handle it.
COUNT_AND_DELAY_PREDICT = """
    const delayMs = arguments[0];
    window.__predictCalls = 0;
    window.__firstSettled = false;
    const realFetch = window.fetch;
    window.fetch = async (url, init) => {
      if (!String(url).endsWith(":predict")) return realFetch(url, init);
      const call = ++window.__predictCalls;
      const response = await realFetch(url, init);
      if (call !== 1 || !delayMs) return response;
      const body = await response.text();
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      setTimeout(() => { window.__firstSettled = true; }, 300);
      return new Response(body, {status: response.status, headers: response.headers});
    };
"""


def test_a_slow_answer_for_an_earlier_photo_never_replaces_the_newer_photos(browser, page_url, photos, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, page_url)
    browser.execute_script(COUNT_AND_DELAY_PREDICT, 1500)
    browser.find_element("id", "file").send_keys(str(photos[0]))  # answered, but held back 1.5 s
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return window.__predictCalls") == 1)  # sent
    fake = tmp_path / "fake.jpg"
    fake.write_text("not a photo")
    browser.find_element("id", "file").send_keys(str(fake))  # chosen while the first is in flight
    error = _wait_for(browser, "error")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return window.__firstSettled"))
    assert browser.execute_script("return window.__predictCalls") == 2
    assert error.text.startswith("fake.jpg was refused: ")
    assert not browser.find_element("id", "result").is_displayed()  # the first photo's answer was dropped
    assert not browser.find_element("id", "busy").is_displayed()


def test_choosing_the_same_photo_again_asks_again_and_a_refusal_clears_the_old_preview(browser, page_url, photos,
                                                                                        tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, page_url)
    browser.execute_script(COUNT_AND_DELAY_PREDICT, 0)
    chooser = browser.find_element("id", "file")
    for expected_calls in (1, 2):
        chooser.send_keys(str(photos[2]))
        WebDriverWait(browser, 60).until(
            lambda d, want=expected_calls: d.execute_script("return window.__predictCalls") == want
            and d.find_element("id", "result").is_displayed())
    assert browser.find_element("id", "preview").is_displayed()

    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    chooser.send_keys(str(text))
    error = _wait_for(browser, "error")
    assert error.text.startswith("notes.txt is not an image")
    assert not browser.find_element("id", "preview").is_displayed()  # not the previous photo beside its error
    assert not browser.find_element("id", "result").is_displayed()
    assert browser.execute_script("return window.__predictCalls") == 2


def test_page_is_not_served_for_unknown_files(page_url):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{page_url}/ui/secret.py", timeout=5)
    assert info.value.code == 404


def test_an_ensemble_without_some_outputs_shows_what_it_answered(browser, tiny_repository_template, photos, tmp_path):
    """An ensemble whose config lists no top-k probabilities, member versions, probabilities or latencies (allowed):
    the page read those columns anyway and said "Could not reach the server" for a 200 answer. It shows the
    ranked labels, the top one's probability, each member's label, and leaves the rest blank."""
    from tests.ensemble.servers import SLIM_OUTPUTS, embedded_server, write_ensemble_config

    config = write_ensemble_config(tmp_path, name="slim", outputs=SLIM_OUTPUTS)
    with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]) as server:
        with connect(rest_url(server)) as client:
            out = client.predict("slim", images=[photos[0].read_bytes()]).outputs
        browser.get(f"{rest_url(server)}/ui")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(lambda d: "AVAILABLE" in d.find_element("id", "model-status").text)
        browser.find_element("id", "file").send_keys(str(photos[0]))
        result = _wait_for(browser, "result")
        items = result.find_elements("css selector", "#top li")
        shown = [(i.find_element("class name", "label").text, i.find_element("class name", "probability").text)
                 for i in items]
        rows = [[td.text for td in tr.find_elements("tag name", "td")]
                for tr in result.find_elements("css selector", "#members tbody tr")]
        assert not browser.find_element("id", "error").is_displayed()
        top_k = int(browser.find_element("tag name", "body").get_attribute("data-top-k"))
    labels = [str(name) for name in out["top_k_labels"][0]][:top_k]
    top = f"{100 * float(np.max(out['probabilities'][0])):.1f} %"
    assert shown == [(labels[0], top), *((name, "") for name in labels[1:])]
    assert rows == [[str(name), "", str(label), "", ""]
                    for name, label in zip(out["member_names"][0], out["member_labels"][0], strict=True)]
