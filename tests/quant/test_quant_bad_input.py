"""Bad input to ``vllm-plugins quantize``: one clear error naming the file or flag, no output, source untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from vllm_plugins.cli import main


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from models.tiny import synthetic_corpus

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(synthetic_corpus(60)))
    return path


@pytest.fixture
def source(tiny_llama, tmp_path) -> Path:
    """A private, writable copy of a tiny Llama (tests break it on purpose)."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_llama(), dst)
    return dst


def _run_fails(capsys, model: Path, out: Path, calib: Path, *extra: str, expect: str) -> str:
    before = _digest(model) if model.is_dir() else None
    capsys.readouterr()  # drop what fixtures printed
    rc = main(["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib),
               "--num-samples", "4", "--seqlen", "64", "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("vllm-plugins quantize: error: "), err
    assert expect in err[0], err[0]
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "partial output left behind"
    if before is not None:
        assert _digest(model) == before, "source checkpoint modified"
    return err[0]


def test_missing_model_dir(capsys, tmp_path, calib):
    _run_fails(capsys, tmp_path / "nope", tmp_path / "out", calib, expect=f"--model {tmp_path / 'nope'}")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(capsys, source, tmp_path, calib):
    shard = source / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    _run_fails(capsys, source, tmp_path / "out", calib, expect=f"{shard}: truncated safetensors")
    assert not (tmp_path / "out").exists()


def test_group_size_not_dividing(capsys, tiny_llama, tmp_path, calib):
    model = tiny_llama(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=192)
    msg = _run_fails(capsys, model, tmp_path / "out", calib, "--group-size", "64", expect="--group-size 64")
    assert "does not divide the input size 96" in msg
    assert not (tmp_path / "out").exists()


def test_nan_weights(capsys, source, tmp_path, calib):
    shard = source / "model.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    msg = _run_fails(capsys, source, tmp_path / "out", calib, expect=str(shard))
    assert name in msg and "NaN" in msg
    assert not (tmp_path / "out").exists()


def test_empty_calibration_file(capsys, source, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    _run_fails(capsys, source, tmp_path / "out", empty, expect=f"--calib {empty}: the calibration file is empty")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(capsys, source, tmp_path, calib):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _run_fails(capsys, source, out, calib, expect=f"--out {out}: already exists (pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    rc = main(["quantize", "--model", str(source), "--out", str(out), "--calib", str(calib),
               "--num-samples", "4", "--seqlen", "64", "--no-progress", "--force"])
    assert rc == 0
    summary = capsys.readouterr().out  # the closing table: one row per decoder layer, then the total
    assert "mean rel. err" in summary and "peak RSS MiB" in summary
    assert [line.split()[0] for line in summary.splitlines()[1:4]] == ["0", "1", "all"]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("change", [{"architectures": ["LlamaForSequenceClassification"]},
                                    {"model_type": "not_a_model", "architectures": ["NotAModelForCausalLM"]}],
                         ids=["not-causal-lm", "unknown-model-type"])
def test_unsupported_architecture(capsys, source, tmp_path, calib, change):
    cfg_path = source / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    msg = _run_fails(capsys, source, tmp_path / "out", calib, expect=f"{cfg_path}: unsupported architecture")
    assert change["architectures"][0] in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device,expect", [
    ("tpu", "--device must be one of auto, cpu, cuda, cuda:N; got 'tpu'"),
    ("cuda:99", "--device cuda:99: "),  # no CUDA here, or fewer than 100 devices
])
def test_bad_device(capsys, tiny_llama, tmp_path, calib, device, expect):
    _run_fails(capsys, tiny_llama(), tmp_path / "out", calib, "--device", device, expect=expect)
    assert not (tmp_path / "out").exists()
