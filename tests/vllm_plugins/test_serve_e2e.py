"""End to end: the real OpenAI-compatible server loads the plugin.

One server is shared by the module; the last test stops it and checks that no
process it started is left behind.
"""

from __future__ import annotations

import re
import socket

import pytest
import requests

from vllm_plugins.serving import VllmServer

REGISTER_LINE = re.compile(r"\((EngineCore|VllmWorker)[^)]*\).*vllm_plugins registered:")


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = VllmServer(tiny_llama(), "--enforce-eager", "--max-model-len", "512", "--dtype", "float32")
    with srv:
        yield srv


def _post(server, path, payload):
    r = requests.post(server.url(path), json=payload, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_greedy(server):
    out = _post(server, "/v1/completions", {
        "model": server.model, "prompt": "Once upon a time", "max_tokens": 6,
        "temperature": 0, "ignore_eos": True,
    })
    assert out["usage"]["completion_tokens"] == 6
    again = _post(server, "/v1/completions", {
        "model": server.model, "prompt": "Once upon a time", "max_tokens": 6,
        "temperature": 0, "ignore_eos": True,
    })
    assert again["choices"][0]["text"] == out["choices"][0]["text"]


def test_chat_completions_greedy(server):
    out = _post(server, "/v1/chat/completions", {
        "model": server.model, "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": True,
    })
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 6


def test_plugin_registered_in_server_processes(server):
    procs = {m.group(1) for m in REGISTER_LINE.finditer(server.log())}
    assert procs == {"EngineCore", "VllmWorker"}, server.log()[-3000:]


def test_shutdown_leaves_no_process(server):
    port = server.port
    server.stop()
    assert server.leftover_pids == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "port still accepting connections"
