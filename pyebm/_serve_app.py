"""The Ray Serve deployment of ``pyebm.serving.build_app`` (imported only when Ray Serve is installed)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, List

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pyebm._serve_core import RequestError, make_server


@serve.deployment
class ModelDeployment:
    """One replica: the server of the directory (``make_server``: a ``PolicyServer`` answering ``POST /act``,
    an ``EnergyServer`` answering ``POST /minimize`` or an ``EBTServer`` answering ``POST /generate``, ``/think``
    and, saved with a descent, ``/minimize``), its requests batched by ``@serve.batch`` (requests to different
    routes of one batch are served by separate calls); ``GET /info``."""

    def __init__(self, model_dir: str, device: str, max_batch_size: int, batch_wait_timeout_s: float):
        self.server = make_server(model_dir, device=device)
        self.batch.set_max_batch_size(max_batch_size)
        self.batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # set per application in __init__
    async def batch(self, items: List[Any]):
        # in a thread: the replica keeps collecting the next batch while this one runs (one batch at a time)
        return await asyncio.to_thread(self.server.run, items)

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/") or "/"
        routes = self.server.routes
        if path.endswith("/info"):
            if request.method != "GET":
                return JSONResponse({"error": "/info answers GET"}, status_code=405)
            return JSONResponse(self.server.info())
        route = next((r for r in routes if path.endswith(f"/{r}")), None)
        if route is None:
            allowed = " or ".join([f"POST /{r}" for r in routes] + ["GET /info"])
            return JSONResponse({"error": f"no route {request.url.path!r}: {allowed}"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": f"/{route} answers POST with a JSON body"}, status_code=405)
        try:
            payload = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return JSONResponse({"error": f"the body is not JSON: {e}"}, status_code=400)
        try:
            item = self.server.parse_route(route, payload)
        except RequestError as e:  # refused before it joins a batch
            return JSONResponse({"error": str(e)}, status_code=e.status)
        answer = await self.batch(item)
        if isinstance(answer, RequestError):
            return JSONResponse({"error": str(answer)}, status_code=answer.status)
        return JSONResponse(answer)
