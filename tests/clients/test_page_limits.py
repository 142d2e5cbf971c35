"""The upload page as the server mounts it: the photo size it allows follows --max_request_bytes, and a page that
asks a model the server does not serve is reported at start. (No browser needed; tests/clients/test_web.py drives
the page in Chromium.)"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import re
import urllib.error
import urllib.request

from tests.ensemble.servers import embedded_server, rest_url


def _post(url: str, photo: bytes, *, gzipped: bool = False) -> int:
    """POST the page's own request body for ``photo`` (gzip-compressed if asked); the HTTP status."""
    body = json.dumps({"signature_name": "serving_default",
                       "inputs": {"image_bytes": [{"b64": base64.b64encode(photo).decode()}]}}).encode()
    headers = {"Content-Type": "application/json"}
    if gzipped:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_page_allows_the_largest_photo_the_server_accepts(tiny_repository_template, tmp_path, photos):
    limit = 300_000
    with embedded_server(tiny_repository_template, tmp_path, models=("tiny_a",), web_ui_model="tiny_a",
                         max_request_bytes=limit) as server:
        with urllib.request.urlopen(f"{rest_url(server)}/ui", timeout=5) as response:
            html = response.read().decode()
        allowed = int(re.search(r'data-max-bytes="(\d+)"', html).group(1))
        assert 0.7 * limit < allowed < 0.75 * limit  # base64 makes a request 4/3 of the photo
        photo = photos[0].read_bytes()
        padded = photo + b"\0" * (allowed - len(photo))  # a JPEG with trailing bytes: still one valid photo
        url = f"{rest_url(server)}/v1/models/tiny_a:predict"
        assert _post(url, padded) == 200  # the largest photo the page lets through is answered
        assert _post(url, padded + b"\0" * (limit // 3)) == 413  # one the page refuses, the server refuses too


def test_a_page_asking_a_model_that_is_not_served_is_reported(tiny_repository_template, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="carclf.serving")
    with embedded_server(tiny_repository_template, tmp_path, models=("tiny_a",), web_ui_model="nope"):
        pass
    warnings = [r.getMessage() for r in caplog.records if "upload page" in r.getMessage()]
    assert warnings == ["the upload page (/ui) asks model 'nope', which this server does not serve (yet); "
                        "--web_ui_model NAME picks another, --web_ui_model '' turns the page off"]
    caplog.clear()
    with embedded_server(tiny_repository_template, tmp_path / "b", models=("tiny_a",), web_ui_model="tiny_a"):
        pass
    assert not [r for r in caplog.records if "upload page" in r.getMessage()]


def test_a_host_mounting_the_page_itself_answers_the_largest_photo_the_page_allows(tiny_ensemble_server, photos):
    """application_with_page (for hosts that build their own application): without max_request_bytes, a photo
    of the page's own limit still fits once base64 JSON makes its request 4/3 of it, and is answered. This
    host keeps aiohttp's default runner, which inflates a gzip body itself: the API does not inflate it twice."""
    import asyncio
    import threading

    from aiohttp import web

    from carclf.clients.web.app import PageSettings, application_with_page
    from carclf.serving.rest import RestApi

    server, limit = tiny_ensemble_server, 200_000
    api = RestApi(server.predictor, server.manager, server.gate, monitoring=server.monitoring,
                  max_request_bytes=10 * limit, timeout_ms=30000, executor=server.executor)
    app = application_with_page(api, PageSettings(model="tiny_a", max_bytes=limit))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{asyncio.run_coroutine_threadsafe(start(), loop).result(30)}"
        with urllib.request.urlopen(f"{base}/ui", timeout=10) as response:
            allowed = int(re.search(r'data-max-bytes="(\d+)"', response.read().decode()).group(1))
        assert allowed == limit
        photo = photos[0].read_bytes()
        padded = photo + b"\0" * (allowed - len(photo))  # a JPEG with trailing bytes: still one valid photo
        assert _post(f"{base}/v1/models/tiny_a:predict", padded) == 200
        assert _post(f"{base}/v1/models/tiny_a:predict", padded, gzipped=True) == 200
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_an_upload_the_browser_abandons_is_no_server_error(tiny_ensemble_server, photos, caplog):
    """A visitor closes the tab (or loses the network) while the page's photo is still uploading: the server
    cannot answer anybody, and nothing went wrong on its side. It must not log an ERROR with a traceback of
    aiohttp's "Connection lost" for each such upload, nor count it as an INTERNAL error in request_count
    (TF Serving's code for a caller that went away is CANCELLED), and it goes on answering photos."""
    import socket
    import time

    server = tiny_ensemble_server
    photo = base64.b64encode(photos[0].read_bytes()).decode()
    body = json.dumps({"signature_name": "serving_default",
                       "inputs": {"image_bytes": [{"b64": photo}]}}).encode()
    head = (b"POST /v1/models/tiny_ensemble:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    counts = server.metrics.request_count
    before = {status: counts.value("tiny_ensemble", status) for status in ("INTERNAL", "CANCELLED", "OK")}
    caplog.set_level(logging.INFO, logger="carclf")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) as upload:
            upload.sendall(head + body[:len(body) // 2])  # half the photo, then the tab is closed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sum(counts.value("tiny_ensemble", s) for s in before) < sum(before.values()) + 3:
        time.sleep(0.05)  # until the server has seen the three uploads end
    assert _post(f"{rest_url(server)}/v1/models/tiny_ensemble:predict", photos[0].read_bytes()) == 200
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [f"{r.levelname} {r.getMessage()}" for r in noisy]
    assert counts.value("tiny_ensemble", "INTERNAL") == before["INTERNAL"]
