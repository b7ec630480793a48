"""``vllm-plugins convert``: a finished artifact is checked before it is published."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file, save_file

from vllm_plugins.cli import main


def test_nan_weights_are_not_published(tiny_llama, tmp_path, capsys):
    """No NaN or Inf in any exported tensor: the byte-for-byte copy of a Llama is checked too."""
    source = tmp_path / "src"
    shutil.copytree(tiny_llama(), source)
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name][0, 1] = float("inf")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", str(source), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vllm-plugins convert: error: {source}: tensor {name} has NaN or Inf values; {out} was not "
                   "written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_empty_output_is_taken_over(tiny_llama, tmp_path):
    """Row 17: every command takes an existing empty output directory over, as quantize now does."""
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(tiny_llama()), str(out)]) == 0
    assert '"model_type": "llama_variant"' in (out / "config.json").read_text()
