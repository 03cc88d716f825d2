"""bench/bench_serve.py at toy scale: a server that floods its stderr before it is ready
(llama.cpp's load log) still gets measured; a server that dies is reported with its log;
our own server on a tiny synthetic model end to end; llama.cpp's llama-server when
A2ATS_LLAMA_SERVER names a built binary; --constrained on the default model (the schema
needs a real model to finish its JSON), its replies validated."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from benchutil import load_bench, write_tiny

serve = load_bench("bench_serve")

# a streaming /v1/completions server that first writes 2 MB to stderr (a pipe holds 64 KB)
FAKE = r'''
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
sys.stderr.write("load log line\n" * 150000)
sys.stderr.flush()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": f" t{i}"}]}).encode() + b"\n\n")
            self.wfile.flush(); time.sleep(0.002)
        u = {"choices": [], "usage": {"completion_tokens": n}}
        self.wfile.write(b"data: " + json.dumps(u).encode() + b"\n\ndata: [DONE]\n\n")
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def test_stderr_flood_does_not_block(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    port = serve.free_port()
    rows = serve.run_server("fake", [sys.executable, str(script), str(port)], port, "m", [1, 3], 4,
                            "/health", ready_timeout=60)
    assert [(r["clients"], r["generated"]) for r in rows] == [(1, 4), (3, 12)]
    assert all(r["tok_per_s"] > 0 and r["itl_median_s"] is not None for r in rows)


def test_dead_server_reports_its_log(tmp_path):
    script = tmp_path / "dead.py"
    script.write_text("import sys\nsys.stderr.write('cannot load the model: boom\\n')\nsys.exit(3)\n")
    port = serve.free_port()
    with pytest.raises(RuntimeError, match="(?s)status 3.*boom"):
        serve.run_server("dead", [sys.executable, str(script)], port, "m", [1], 2, ready_timeout=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("bench_serve") / "tiny.gguf")


def test_ours_toy(tiny, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert serve.main(["--model", str(tiny), "--tokens", "3", "--clients", "1,2", "-c", "2048",
                       "--no-llama-cpp-python", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["server"], r["clients"], r["generated"]) for r in data["rows"]] == \
        [("a2ats-lite", 1, 3), ("a2ats-lite", 2, 6)]
    assert any("no --llama-server" in n for n in data["notes"])
    assert "| a2ats-lite | 2 | 6/6 |" in capsys.readouterr().out


@pytest.mark.skipif(not os.environ.get("A2ATS_LLAMA_SERVER"),
                    reason="A2ATS_LLAMA_SERVER (a llama-server binary) not set")
def test_llama_server_toy(tiny, tmp_path):
    out = tmp_path / "serve.json"
    assert serve.main(["--model", str(tiny), "--tokens", "3", "--clients", "1,2", "-c", "2048",
                       "--no-llama-cpp-python", "--no-ours", "--llama-server",
                       os.environ["A2ATS_LLAMA_SERVER"], "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["server"], r["clients"], r["generated"]) for r in rows] == \
        [("llama-server", 1, 3), ("llama-server", 2, 6)]


def test_valid_person():
    cons = sys.modules["serve_constrained"]
    assert cons.valid_person('{"name": "Ann", "age": 30, "tags": ["chef", "cats"]}')
    for bad in ('{"name": "Ann", "age": 30, "tags": ["a", "b", "c", "d", "e"]}',   # 5 tags
                '{"name": "Ann", "age": "30", "tags": []}',                        # age a string
                '{"name": "Ann", "age": 30}',                                      # no tags
                '{"name": "Ann", "age": 30, "tags": [], "x": 1}',                  # extra key
                '{"name": "Ann", "age": 30, "tags": ["ch'):                        # cut short
        assert not cons.valid_person(bad), bad


def test_constrained_toy(default_model, tmp_path, capsys):
    """2 requests per mode and level (1 client, then 2), one round: every constrained reply
    parses and matches the schema; the free twins generate as many tokens."""
    out = tmp_path / "constrained.json"
    assert serve.main(["--constrained", "--model", str(default_model), "--clients", "1,2",
                       "--requests", "1", "--rounds", "1", "--tokens", "48",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["clients"], r["mode"], r["requests"]) for r in rows] == [
        (1, "unconstrained", 1), (1, "constrained", 1), (2, "unconstrained", 2), (2, "constrained", 2)]
    lengths = data["unconstrained_tokens_per_prompt"]          # client i sends prompt i
    assert len(lengths) == 2 and all(0 < n <= 48 for n in lengths)
    for free, cons in zip(rows[::2], rows[1::2]):
        assert cons["invalid"] == 0 and free["invalid"] is None
        assert free["completion_tokens"] == sum(lengths[:free["clients"]])
        assert cons["completion_tokens"] > 0
        assert cons["ratio_tok_per_s"] == pytest.approx(cons["tok_per_s"] / free["tok_per_s"])
        assert cons["ms_per_token_median"] > 0 and cons["ratio_ms_per_token"] > 0
        assert cons["server_steps"] > 0
    assert data["parallel"] == 2 and data["max_tokens"] == 48 and len(data["machine"]["loadavg_end"]) == 3
    table = capsys.readouterr().out
    assert "| clients | mode | requests | completion tokens | tok/s | median ms/token |" in table
    assert "| 2 | constrained | 2 |" in table and "| 1 | unconstrained | 1 |" in table
