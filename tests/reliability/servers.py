"""The reliability tests' server setup: names, bounds and the upload page mounted on a running server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from tests.serving.conftest import REPO_ROOT

BACKBONE = "tiny_a"
ENSEMBLE = "car_ensemble"
MAX_REQUEST_BYTES = 2 * 1024 * 1024
SHIPPED_BATCHING = REPO_ROOT / "serving" / "batching.config"


@contextlib.contextmanager
def upload_page(server) -> Iterator[str]:
    """Base URL of the upload page (``clients/web``) over ``server``'s REST API, as the server mounts it:
    ``carclf.clients.web.app.application_with_page`` on the server's own predictor and model manager."""
    from aiohttp import web

    from carclf.clients.web.app import PageSettings, application_with_page
    from carclf.serving.rest import RestApi

    api = RestApi(server.predictor, server.manager, server.gate, monitoring=server.monitoring,
                  max_request_bytes=server.options.max_request_bytes,
                  timeout_ms=server.options.rest_api_timeout_in_ms, executor=server.executor)
    app = application_with_page(api, PageSettings(model=ENSEMBLE),
                                max_request_bytes=server.options.max_request_bytes)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1]

    thread = threading.Thread(target=loop.run_forever, name="upload-page", daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
