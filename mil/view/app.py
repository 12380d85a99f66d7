"""The viewer's web application (Starlette): pages, JSON, overlays and Deep Zoom tiles; read-only.

Every request must carry the access token, as in Jupyter: ``?token=...`` in the URL (the
printed link), after which a cookie scoped to this server's port carries it for the page's
own requests (Deep Zoom tiles, overlays). Slides are addressed by their id in the run's
cohort only; an id that is not there, ``..`` or a path is a 404, and no route writes anything.

Routes (all GET):

* ``/`` cohort page, ``/slide/{slide_id}`` slide page, ``/static/...`` scripts, styles, OpenSeadragon;
* ``/api/cohort``, ``/api/slide/{slide_id}``: JSON for the pages;
* ``/api/slide/{slide_id}/overlay/{scale}.png`` (``slide`` or ``cohort``), ``/api/slide/{slide_id}/tissue.png``,
  ``/api/slide/{slide_id}/tile/{index}.jpeg`` (gallery);
* ``/dz/{slide_id}/slide.dzi`` and ``/dz/{slide_id}/slide_files/{level}/{col}_{row}.jpeg``: Deep Zoom.
"""

from __future__ import annotations

import html
import logging
import secrets
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from mil.attention import HeatmapError
from mil.view.data import SCALES, NotFound, ViewerData, colour_stops

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC = HERE / "static"
PAGES = HERE / "pages"
CACHE = {"Cache-Control": "private, max-age=3600"}


def cookie_name(port: int) -> str:
    """Cookies are not port-specific, so each server's token cookie is named after its port."""
    return f"mil_view_token_{port}"


class TokenGate:
    """ASGI middleware: 403 unless the request carries the token (query or this server's cookie)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        port = (scope.get("server") or ("", 0))[1]
        given = request.query_params.get("token")
        ok_query = given is not None and secrets.compare_digest(given, self.token)
        cookie = request.cookies.get(cookie_name(port), "")
        if not (ok_query or secrets.compare_digest(cookie, self.token)):
            response = error_page(403, "Access token required",
                                  "Open the link that <code>mil view</code> printed (it ends in <code>?token=...</code>).")
            await response(scope, receive, send)
            return
        if not ok_query:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                header = (f"{cookie_name(port)}={self.token}; Path=/; HttpOnly; SameSite=Strict").encode()
                message.setdefault("headers", []).append((b"set-cookie", header))
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def error_page(status: int, title: str, detail_html: str) -> HTMLResponse:
    """A plain page for the browser; never a traceback."""
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='stylesheet' href='/static/view.css'></head><body><main class='error'>"
            f"<h1>{html.escape(title)}</h1><p>{detail_html}</p><p><a href='/'>cohort</a></p></main></body></html>")
    return HTMLResponse(body, status_code=status)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def create_app(data: ViewerData, token: str) -> ASGIApp:
    """The viewer for ``data``, behind the token gate."""

    def page(name: str) -> HTMLResponse:
        return HTMLResponse((PAGES / name).read_text(encoding="utf-8"))

    async def cohort_page(request: Request) -> Response:
        return page("cohort.html")

    async def slide_page(request: Request) -> Response:
        data.bag_of(request.path_params["slide_id"])
        return page("slide.html")

    async def api_cohort(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(data.cohort_rows))

    async def api_slide(request: Request) -> Response:
        sid = request.path_params["slide_id"]
        view = await run_in_threadpool(data.view, sid)
        base = f"/api/slide/{quote(sid, safe='')}"
        body = view.summary()
        body.update(data.gallery(sid))
        body["overlay"] = {s: f"{base}/overlay/{s}.png" for s in SCALES}
        body["tissue"] = f"{base}/tissue.png" if view.path is not None else None
        body["dzi"] = f"/dz/{quote(sid, safe='')}/slide.dzi" if view.path is not None else None
        body["tile_url"] = f"{base}/tile/" if view.path is not None else None
        body["model"] = str(data.run.config.model.name)
        body["n_models"] = len(data.run.weights)
        body["colours"] = colour_stops()
        return JSONResponse(body)

    async def overlay(request: Request) -> Response:
        png = await run_in_threadpool(data.overlay_png, request.path_params["slide_id"], request.path_params["scale"])
        return Response(png, media_type="image/png", headers=CACHE)

    async def tissue(request: Request) -> Response:
        png = await run_in_threadpool(data.tissue_png, request.path_params["slide_id"])
        return Response(png, media_type="image/png", headers=CACHE)

    async def gallery_tile(request: Request) -> Response:
        p = request.path_params
        jpeg = await run_in_threadpool(data.tile_jpeg, p["slide_id"], p["index"])
        return Response(jpeg, media_type="image/jpeg", headers=CACHE)

    async def dzi(request: Request) -> Response:
        xml = await run_in_threadpool(data.dzi, request.path_params["slide_id"])
        return Response(xml, media_type="application/xml")

    async def dz_tile(request: Request) -> Response:
        p = request.path_params
        jpeg = await run_in_threadpool(data.dz_tile, p["slide_id"], p["level"], p["col"], p["row"])
        return Response(jpeg, media_type="image/jpeg", headers=CACHE)

    async def not_found(request: Request, exc: Exception) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": "not found"}, status_code=404)
        return error_page(404, "Not found", "Nothing here: slides are addressed by their id in the run's cohort.")

    async def bad_input(request: Request, exc: Exception) -> Response:
        logger.warning("%s: %s", request.url.path, exc)
        if _wants_json(request):
            return JSONResponse({"error": str(exc)}, status_code=422)
        return error_page(422, "Cannot show this", html.escape(str(exc)))

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("%s failed", request.url.path)
        message = "internal error; the server's log has the details"
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=500)
        return error_page(500, "Internal error", message)

    routes = [
        Route("/", cohort_page),
        Route("/slide/{slide_id}", slide_page),
        Route("/api/cohort", api_cohort),
        Route("/api/slide/{slide_id}", api_slide),
        Route("/api/slide/{slide_id}/overlay/{scale}.png", overlay),
        Route("/api/slide/{slide_id}/tissue.png", tissue),
        Route("/api/slide/{slide_id}/tile/{index:int}.jpeg", gallery_tile),
        Route("/dz/{slide_id}/slide.dzi", dzi),
        Route("/dz/{slide_id}/slide_files/{level:int}/{col:int}_{row:int}.jpeg", dz_tile),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {
        404: not_found, NotFound: not_found, HeatmapError: bad_input, ValueError: bad_input,
        FileNotFoundError: bad_input, Exception: server_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    return TokenGate(app, token)

