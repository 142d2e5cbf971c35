"""The upload page, mounted on a server's REST port (``GET /ui``).

The page is static (index.html, app.js, style.css): the browser calls the TF Serving REST API of the
same origin (``POST /v1/models/<model>:predict`` with the photo as ``{"b64": ...}``), so it needs no
server code of its own beyond serving three files. ``add_routes`` mounts them on an aiohttp application
(the embedded server and the gateway do, for ``--web_ui_model``); ``page_file`` gives the bytes for any
other server.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from carclf import contract

WEB_DIR = Path(__file__).resolve().parent
DEFAULT_BASE = "/ui"
CONTENT_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class PageSettings:
    base: str = DEFAULT_BASE  # where the page is mounted
    model: str = "car_ensemble"  # the model the page asks
    max_bytes: int = contract.MAX_IMAGE_BYTES  # uploads larger than this are refused in the browser
    top_k: int = 5


def page_file(name: str, settings: PageSettings = PageSettings()) -> tuple[bytes, str] | None:
    """(body, content type) of one of the page's files, or None for any other name."""
    name = name or "index.html"
    if name not in CONTENT_TYPES:
        return None
    text = (WEB_DIR / name).read_text(encoding="utf-8")
    if name == "index.html":
        values = {
            "BASE": settings.base.rstrip("/"),
            "MODEL": settings.model,
            "API": f"/v1/models/{quote(settings.model, safe='')}",
            "MAX_BYTES": str(int(settings.max_bytes)),
            "TOP_K": str(int(settings.top_k)),
        }
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return text.encode("utf-8"), CONTENT_TYPES[name]


def add_routes(app, settings: PageSettings = PageSettings()) -> None:
    """Mount the page on an ``aiohttp.web.Application``: GET <base>, <base>/ and <base>/<file>.

    Call it before a catch-all route (aiohttp matches routes in the order they were added), e.g. in
    ``carclf.serving.rest.RestApi.app()`` just before ``app.router.add_route("*", "/{tail:.*}", ...)``.
    """
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        found = page_file(request.match_info.get("name", ""), settings)
        if found is None:
            return web.json_response({"error": f"no such page file: {request.path}"}, status=404)
        body, content_type = found
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})

    base = settings.base.rstrip("/")
    app.router.add_get(base, handle)
    app.router.add_get(base + "/", handle)
    app.router.add_get(base + "/{name}", handle)


def application_with_page(rest_api, settings: PageSettings = PageSettings(), *, max_request_bytes: int | None = None):
    """An aiohttp application serving the page and, for every other path, a ``carclf.serving.rest.RestApi``
    (for hosts that build their own application instead of passing ``extra_routes`` to RestApi). Run it with
    ``web.AppRunner(app, auto_decompress=False)``, as ``serving.rest.start_rest`` does, so that compressed
    bodies are inflated within the size limit (``serving.content_coding``)."""
    from aiohttp import web

    app = web.Application(client_max_size=max_request_bytes or settings.max_bytes * 2)
    add_routes(app, settings)
    app.router.add_route("*", "/{tail:.*}", rest_api.handle)
    return app
