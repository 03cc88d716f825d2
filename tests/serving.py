"""A real uvicorn server on a loopback port for the server tests, and its openai client; the
default model served that way as module fixtures."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 30, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.app.state.engine


def openai_client(srv, key: str = "x"):
    import openai
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=300)


def served_default_model(n_ctx: int, **app_kw):
    """Module fixtures (rt, srv, client) for a test module to bind to those names: the default
    model's Runtime (n_ctx, 8 sequences, no prefix cache), it served as model "m" on a loopback
    port (create_app with app_kw), and that server's openai client."""
    import pytest

    @pytest.fixture(scope="module")
    def rt(default_model):
        from a2ats_lite.runtime import Runtime
        r = Runtime(default_model, n_ctx=n_ctx, max_seqs=8, cache_seqs=0)
        yield r
        r.close()

    @pytest.fixture(scope="module")
    def srv(rt):
        from a2ats_lite.server import create_app
        with Server(create_app(rt, model_name="m", **app_kw)) as s:
            yield s

    @pytest.fixture(scope="module")
    def client(srv):
        return openai_client(srv)

    return rt, srv, client
