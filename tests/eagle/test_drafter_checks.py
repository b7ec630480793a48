"""Bad input: a drafter that cannot work with its target is refused with one
clear error naming the file (vLLM drafter class) or the flag
(``train-drafter``), and ``train-drafter`` writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from eagle.checks import DrafterError, check_aux_layer_ids, check_d2t


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


CASES = {
    "draft_vocab_too_large": (lambda c: c.update(draft_vocab_size=4096),
                              r"config\.json: draft vocabulary size 4096 is larger than the target's vocabulary \(512\)"),
    "hidden_size_mismatch": (lambda c: c.update(hidden_size=96, target_hidden_size=96),
                             r"config\.json: hidden_size 96 does not match the target's hidden size 128"),
    "aux_layer_beyond_depth": (lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[0, 1, 5]),
                               r"config\.json: aux hidden state layer id\(s\) \[5\] are beyond the target's depth"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_drafter_refuses_bad_config(case, llama_target, llama_drafter, vllm_drafter, tmp_path):
    edit, message = CASES[case]
    bad = _variant(llama_drafter, tmp_path / case, edit)
    with pytest.raises(DrafterError, match=message) as info:
        vllm_drafter(llama_target, bad)
    assert str(bad) in str(info.value)


def test_vllm_drafter_refuses_d2t_out_of_range(llama_target, llama_drafter, vllm_drafter, raw_tensors):
    weights = raw_tensors(llama_drafter)
    weights["d2t"] = weights["d2t"].clone()
    weights["d2t"][3] = 10_000
    with pytest.raises(DrafterError, match=r"d2t is out of range: draft id 3 maps to target id"):
        vllm_drafter(llama_target, llama_drafter, weights=weights)


def test_pure_checks():
    check_d2t(torch.tensor([0, 1, 1]), 4, "x")  # ids 0, 2, 3
    with pytest.raises(DrafterError, match="same target id"):
        check_d2t(torch.tensor([1, 0]), 4, "x")  # ids 1, 1
    with pytest.raises(DrafterError, match="out of range"):
        check_d2t(torch.tensor([-1]), 4, "x")
    check_aux_layer_ids([0, 1, 2], 2, "x")  # id == depth is the last layer's output
    with pytest.raises(DrafterError, match="repeat"):
        check_aux_layer_ids([1, 1, 2], 2, "x")


@pytest.mark.parametrize("flags, message", [
    (["--draft-vocab-size", "4096"], "--draft-vocab-size: draft vocabulary size 4096 is larger"),
    (["--aux-layer-ids", "0,1,9"], "--aux-layer-ids: aux hidden state layer id(s) [9] are beyond"),
    (["--ttt-steps", "0"], "--ttt-steps 0: must be at least 1"),
    # Row 10: exit 0 with every float tensor NaN.
    (["--target-temperature", "0"], "--target-temperature 0.0: must be positive"),
    # Row 12: silently became 1024.
    (["--draft-vocab-size", "0"], "--draft-vocab-size 0: must be at least 1"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
])
def test_train_drafter_cli_rejects(flags, message, llama_target, synthetic_text, tmp_path, capsys):
    from vllm_plugins.cli import main

    out = tmp_path / "out"
    code = main(["train-drafter", "--target", str(llama_target), "--data", str(synthetic_text),
                 "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()
    assert not any(p.name.startswith(".train-drafter-") for p in tmp_path.iterdir())


def _train_drafter_fails(capsys, target, data, out, *flags) -> str:
    from vllm_plugins.cli import main

    capsys.readouterr()
    code = main(["train-drafter", "--target", str(target), "--data", str(data), "--out", str(out),
                 "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vllm-plugins train-drafter: error: "), err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return err[0]


def test_head_dim_checked_before_self_distillation(llama_target, synthetic_text, tmp_path, capsys, monkeypatch):
    """Row 18: --head-dim 48 was refused only after minutes of self-distillation."""
    import eagle.train

    def self_distill(*args, **kwargs):
        raise AssertionError("self-distillation ran before --head-dim was checked")

    monkeypatch.setattr(eagle.train, "self_distill", self_distill)
    msg = _train_drafter_fails(capsys, llama_target, synthetic_text, tmp_path / "out", "--head-dim", "48")
    assert "--head-dim 48: does not divide hidden size 128" in msg


def test_data_not_utf8(llama_target, tmp_path, capsys):
    """Row 9: a UnicodeDecodeError traceback."""
    data = tmp_path / "latin1.txt"
    data.write_bytes("Once upon a time, a caf\u00e9.\n\n".encode("latin-1") * 50)
    msg = _train_drafter_fails(capsys, llama_target, data, tmp_path / "out")
    assert f"--data {data}: not UTF-8 text" in msg


def test_quantized_target(llama_target, synthetic_text, tmp_path, capsys):
    """Row 11: exit 0 with a drafter trained against a random target (no linear weight loaded)."""
    from vllm_plugins.cli import main

    export = tmp_path / "w4"
    assert main(["quantize", "--model", str(llama_target), "--out", str(export), "--calib", str(synthetic_text),
                 "--num-samples", "4", "--seqlen", "64", "--no-progress", "--method", "rtn"]) == 0
    msg = _train_drafter_fails(capsys, export, synthetic_text, tmp_path / "out")
    assert f"--target {export}: a quantized checkpoint (quant_method 'vllm_plugins')" in msg


def test_export_refuses_nan(llama_target, tmp_path):
    """Row 10: a drafter with NaN weights is never published."""
    from transformers import AutoTokenizer

    from eagle.train import TrainDrafterConfig, drafter_config, export, init_drafter, load_target

    cfg = TrainDrafterConfig(target=llama_target, data=tmp_path, out=tmp_path / "out")
    target = load_target(llama_target)
    ids = torch.arange(256)
    dcfg = drafter_config(cfg, target.config, (0, 1, 2), 256)
    drafter = init_drafter(dcfg, target, ids, 3)
    with torch.no_grad():
        drafter.fc.weight[0, 0] = float("nan")
    with pytest.raises(DrafterError, match=r"training diverged; nothing was written to --out .*: tensor fc.weight "
                                           r"has NaN or Inf values"):
        export(drafter, dcfg, cfg, AutoTokenizer.from_pretrained(llama_target))
    assert list(tmp_path.iterdir()) == []


def test_loaders_refuse_nan(llama_target, llama_drafter, vllm_drafter, raw_tensors, tmp_path):
    """Row 10: the loader served an all-NaN drafter without a warning."""
    from eagle.layouts import read_drafter

    weights = raw_tensors(llama_drafter)
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name].clone()
    weights[name][1, 2] = float("nan")
    with pytest.raises(DrafterError, match=rf"weights: tensor {name} has NaN or Inf values"):
        vllm_drafter(llama_target, llama_drafter, weights=weights)
    bad = tmp_path / "bad"
    shutil.copytree(llama_drafter, bad)
    from safetensors.torch import save_file

    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DrafterError, match=rf"{bad}: tensor {name} has NaN or Inf values"):
        read_drafter(bad)
