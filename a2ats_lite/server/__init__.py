"""OpenAI-compatible HTTP server on the Engine (`a2ats-lite serve`).

    app = create_app(runtime, model_name="gemma-3-270m")      # a Starlette app
    serve(runtime, "127.0.0.1", 8080)                         # uvicorn, until Ctrl-C

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with SSE
streaming), GET /v1/models, GET /health, GET /metrics (Prometheus text).

    loop.py      the engine loop: the one thread that owns the Engine
    schemas.py   the OpenAI wire format: request parsing/validation, errors, response objects
    routes.py    the route handlers over an AppState (app.state.server)
    app.py       create_app (routes + state) and serve (uvicorn)
"""
try:  # the `server` extra
    import anyio  # noqa: F401
    import starlette  # noqa: F401
except ImportError as e:  # pragma: no cover - checked by the CLI before anything loads
    raise ImportError("the server needs starlette and uvicorn: pip install 'a2ats-lite[server]'") from e

from .app import create_app, serve
from .loop import EngineLoop
from .routes import AppState
from .schemas import APIError

__all__ = ["create_app", "serve", "AppState", "EngineLoop", "APIError"]
