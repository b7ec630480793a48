"""Bad input to ``vllm-plugins quantize``: one clear error naming the file or flag, no output, source untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from quant_helpers import tree_digest
from vllm_plugins.cli import main


def _run_fails(capsys, model: Path, out: Path, calib: Path, *extra: str, expect: str) -> str:
    before = tree_digest(model) if model.is_dir() else None
    capsys.readouterr()  # drop what fixtures printed
    rc = main(["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib),
               "--num-samples", "4", "--seqlen", "64", "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("vllm-plugins quantize: error: "), err
    assert expect in err[0], err[0]
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "partial output left behind"
    if before is not None:
        assert tree_digest(model) == before, "source checkpoint modified"
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


def _edit_tensor(source: Path, name: str, edit) -> Path:
    shard = source / "model.safetensors"
    tensors = load_file(shard)
    tensors[name] = edit(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


@pytest.mark.parametrize("dtype", ["int32", "int8"])
def test_integer_weight(capsys, source, tmp_path, calib, dtype):
    """Row 1: integers stored for a float weight were quantized as floats, exit 0."""
    import torch

    name = "model.layers.0.self_attn.q_proj.weight"
    shard = _edit_tensor(source, name, lambda t: (t * 100).round().to(getattr(torch, dtype)))
    msg = _run_fails(capsys, source, tmp_path / "out", calib, expect=f"{shard}: tensor {name} is stored as I")
    assert "expected a float dtype" in msg


def test_wrong_shape(capsys, source, tmp_path, calib):
    """Row 6: a size-mismatch traceback."""
    name = "model.layers.1.mlp.up_proj.weight"
    shard = _edit_tensor(source, name, lambda t: t[:-8].clone())
    _run_fails(capsys, source, tmp_path / "out", calib,
               expect=f"{shard}: tensor {name} has shape [248, 128], but config.json makes it [256, 128]")


def test_weight_too_large_for_float16_scales(capsys, source, tmp_path, calib):
    """Row 7: an OverflowError traceback."""
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = _edit_tensor(source, name, lambda t: t * 1e25)
    msg = _run_fails(capsys, source, tmp_path / "out", calib, expect=f"{shard}: tensor {name} has values up to")
    assert "float16 scales" in msg


def test_override_splits_fused_qkv(capsys, source, tmp_path, calib):
    """Row 8: exit 0 with an export vLLM refuses (q/k/v "must be quantized alike")."""
    msg = _run_fails(capsys, source, tmp_path / "out", calib, "--override", "model.layers.*.self_attn.q_proj=w8a8",
                     expect="--override model.layers.*.self_attn.q_proj=w8a8: model.layers.0.self_attn would get")
    assert "q_proj w8a8, k_proj w4a16 group 128, v_proj w4a16 group 128" in msg
    assert "must be quantized alike" in msg


def test_ignore_splits_fused_gate_up(capsys, source, tmp_path, calib):
    _run_fails(capsys, source, tmp_path / "out", calib, "--ignore", "*.mlp.gate_proj", "--format", "native",
               expect="--ignore *.mlp.gate_proj: model.layers.0.mlp would get gate_proj left in float")


@pytest.mark.parametrize("flags, expect", [
    (["--seqlen", "513"], "--seqlen 513 is longer than the model's max_position_embeddings (512)"),
    (["--override", "model.layers.*.mlp.nothing=w8a8"],
     "--override model.layers.*.mlp.nothing: matches no decoder-layer linear"),
    (["--ignore", "model.nothing.*"], "--ignore model.nothing.*: matches no linear module"),
], ids=["seqlen", "override", "ignore"])
def test_silently_accepted_flags(capsys, source, tmp_path, calib, flags, expect):
    """Row 12: accepted silently."""
    _run_fails(capsys, source, tmp_path / "out", calib, *flags, expect=expect)


def test_corrupt_header(capsys, source, tmp_path, calib):
    """Row 14: reported as truncated with a header of 5135589295697051975 bytes."""
    shard = source / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:16] = b"GARBAGE!GARBAGE!"
    shard.write_bytes(bytes(data))
    _run_fails(capsys, source, tmp_path / "out", calib, expect=f"{shard}: corrupt safetensors file")


def test_calib_is_a_directory(capsys, source, tmp_path):
    """Row 15: "no such file"."""
    _run_fails(capsys, source, tmp_path / "out", tmp_path, expect=f"--calib {tmp_path}: is a directory")


def test_quantized_model(capsys, source, tmp_path, calib):
    """Row 16: an export of this toolkit as --model: "lacks ...q_proj.weight"."""
    export = tmp_path / "w4"
    assert main(["quantize", "--model", str(source), "--out", str(export), "--calib", str(calib),
                 "--num-samples", "4", "--seqlen", "64", "--no-progress", "--method", "rtn"]) == 0
    _run_fails(capsys, export, tmp_path / "out", calib,
               expect=f"{export / 'config.json'}: the checkpoint is already quantized (quant_method 'vllm_plugins')")


def test_mixture_of_experts(capsys, tmp_path, calib, tiny_llama):
    """Row 16: a Mixtral checkpoint: "lacks model.layers.0.mlp.gate.weight"."""
    import shutil

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                           num_experts_per_tok=1, max_position_embeddings=256)
    model_dir = tmp_path / "mixtral"
    MixtralForCausalLM(config).save_pretrained(model_dir)
    for f in tiny_llama().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    msg = _run_fails(capsys, model_dir, tmp_path / "out", calib,
                     expect=f"{model_dir / 'config.json'}: unsupported architecture ['MixtralForCausalLM']")
    assert "mixture-of-experts" in msg


def test_existing_empty_output_is_taken_over(capsys, source, tmp_path, calib):
    """Row 17: an existing empty --out was refused, while train-drafter and quant.outdir take one over."""
    out = tmp_path / "out"
    out.mkdir()
    assert main(["quantize", "--model", str(source), "--out", str(out), "--calib", str(calib),
                 "--num-samples", "4", "--seqlen", "64", "--no-progress", "--method", "rtn"]) == 0
    assert (out / "model.safetensors.index.json").is_file()


def test_shard_writer_refuses_non_finite(tmp_path):
    """No NaN or Inf in an exported tensor: a shard with one is never written."""
    import torch

    from quant.checkpoint import ShardWriter
    from quant.errors import QuantInputError

    writer = ShardWriter(tmp_path, 1)
    bad = torch.zeros(4, 4, dtype=torch.float16)
    bad[1, 1] = float("inf")
    with pytest.raises(QuantInputError, match=r"exported tensor model.layers.0.mlp.down_proj.scales has NaN or Inf"):
        writer.write_shard({"model.layers.0.mlp.down_proj.qweight": torch.zeros(4, 1, dtype=torch.int32),
                            "model.layers.0.mlp.down_proj.scales": bad})
    assert list(tmp_path.iterdir()) == []
