"""vLLM's VLLM_PLUGINS allow-list decides whether our register() runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import sys
reg = sys.modules.get("vllm_plugins.registration")
print("REGISTERED" if reg is not None and reg._registered is not None else "NOT-REGISTERED")
"""


def _probe(allow: str) -> str:
    env = {**os.environ, "VLLM_PLUGINS": allow}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "allow, expected",
    [
        ("vllm_plugins", "REGISTERED"),
        ("lora_filesystem_resolver", "NOT-REGISTERED"),
        ("", "NOT-REGISTERED"),
    ],
)
def test_vllm_plugins_allow_list(allow, expected):
    assert _probe(allow) == expected
