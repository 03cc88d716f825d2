"""The Starlette app and the uvicorn runner: create_app wires the routes to an AppState,
serve runs it until Ctrl-C / SIGTERM."""
from __future__ import annotations

from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from . import routes
from .loop import EngineLoop
from .routes import AppState


@asynccontextmanager
async def _lifespan(app):
    engine = app.state.server.engine
    engine.start()
    try:
        yield
    finally:
        engine.stop()


def create_app(runtime, *, model_name: str, api_key: str | None = None, queue_size: int = 64,
               max_body: int = 1 << 20, body_timeout: float = 30.0,
               cors_origins: list[str] | None = None):
    """The Starlette app. Its engine loop starts with the app's lifespan (or on the first
    request when the app is driven without one, e.g. by httpx's ASGITransport) and
    stops at shutdown; app.state.engine is the EngineLoop, app.state.server the AppState.
    cors_origins: browser origins allowed to call the API ("*": any); None: no CORS headers,
    so browsers refuse cross-origin calls."""
    state = AppState(runtime, EngineLoop(runtime), model_name, api_key=api_key,
                     queue_size=queue_size, max_body=max_body, body_timeout=body_timeout)
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=[
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
        Route("/v1/models", routes.models, methods=["GET"]),
        Route("/health", routes.health, methods=["GET"]),
        Route("/metrics", routes.metrics, methods=["GET"]),
    ], exception_handlers={HTTPException: routes.http_error, Exception: routes.server_error},
        middleware=middleware, lifespan=_lifespan)
    app.state.server = state
    app.state.engine = state.engine
    app.state.model_name = model_name
    return app


def serve(runtime, host: str = "127.0.0.1", port: int = 8080, *, model_name: str | None = None,
          api_key: str | None = None, queue_size: int = 64, max_body: int = 1 << 20,
          log_level: str = "warning", on_ready=None, header_timeout: float = 10.0,
          body_timeout: float = 30.0, max_connections: int = 256,
          cors_origins: list[str] | None = None) -> None:
    """Run the server until Ctrl-C / SIGTERM (uvicorn handles the signals).
    header_timeout: seconds for a request's headers to arrive (slow clients are closed);
    body_timeout: for its body (408); max_connections: beyond it requests get 503."""
    import uvicorn

    name = model_name or runtime.model_path.name
    app = create_app(runtime, model_name=name, api_key=api_key, queue_size=queue_size,
                     max_body=max_body, body_timeout=body_timeout, cors_origins=cors_origins)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=3,
                            http=guarded_h11(header_timeout), limit_concurrency=max_connections)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # end open streams now (an error event, then [DONE]) so shutdown does not wait
            app.state.engine.stop(timeout=0)
            super().handle_exit(sig, frame)

    server = _Server(config)
    if on_ready is not None:
        orig = server.startup

        async def startup(sockets=None):
            await orig(sockets=sockets)
            if server.started:
                on_ready(server)
        server.startup = startup
    try:
        server.run()
    except KeyboardInterrupt:      # uvicorn re-raises the Ctrl-C it handled: we are done
        pass
    if not server.started:
        raise OSError(f"could not start the server on {host}:{port} (is the port in use?)")


def guarded_h11(header_timeout: float):
    """uvicorn's h11 protocol with a deadline on request headers: a connection whose next
    request's headers have not all arrived header_timeout seconds after it opened (or after
    its previous response) is closed. uvicorn has no such limit, so a client dripping a
    header byte at a time would hold its connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc):
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self):
            self._cancel_header_deadline()
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _cancel_header_deadline(self):
            t = getattr(self, "_header_deadline", None)
            if t is not None:
                t.cancel()
            self._header_deadline = None

        def _headers_late(self):
            self._header_deadline = None
            # IDLE: no complete request line + headers yet (after them h11 moves on)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11
