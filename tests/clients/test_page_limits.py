"""The upload page as the server mounts it: the photo size it allows follows --max_request_bytes, and a page that
asks a model the server does not serve is reported at start. (No browser needed; tests/clients/test_web.py drives
the page in Chromium.)"""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.error
import urllib.request

from tests.ensemble.servers import embedded_server, rest_url


def _post(url: str, photo: bytes) -> int:
    """POST the page's own request body for ``photo``; the HTTP status."""
    body = json.dumps({"signature_name": "serving_default",
                       "inputs": {"image_bytes": [{"b64": base64.b64encode(photo).decode()}]}}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
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
