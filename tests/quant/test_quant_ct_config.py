"""The compressed-tensors ``quantization_config`` is written without the library: compare it with the library's."""

from __future__ import annotations

import pytest

from quant.config import LayerScheme
from quant.export import _compressed_tensors_config

W4, W4_64, W4_CHANNEL, W8 = LayerScheme("w4a16", 128), LayerScheme("w4a16", 64), LayerScheme("w4a16", -1), LayerScheme("w8a8")


def _library_config(default: LayerScheme, schemes: dict, ignored: list[str]) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def scheme(s: LayerScheme, targets):
        if s.scheme == "w4a16":
            weights = QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                       strategy="channel" if s.group_size == -1 else "group",
                                       group_size=None if s.group_size == -1 else s.group_size)
            return QuantizationScheme(targets=targets, weights=weights, format="pack-quantized")
        return QuantizationScheme(
            targets=targets, weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
            format="int-quantized")

    groups = {"group_0": scheme(default, ["Linear"])}
    others: dict = {}
    for name, s in sorted(schemes.items()):
        if s is not None and s != default:
            others.setdefault(s, []).append(name)
    for i, (s, names) in enumerate(others.items(), 1):
        groups[f"group_{i}"] = scheme(s, names)
    formats = {g.format for g in groups.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed",
                              ignore=ignored).model_dump(mode="json")


@pytest.mark.parametrize("default,schemes", [
    (W4, {"m.q": W4, "m.x": None}),
    (W4_CHANNEL, {"m.q": W4_CHANNEL}),
    (W8, {"m.q": W8}),
    (W4, {"m.q": W4, "m.d": W8, "m.o": W4_64, "m.u": W8, "m.x": None}),
], ids=["w4a16-g128", "w4a16-channel", "w8a8", "mixed"])
def test_config_equals_the_library_model_dump(default, schemes):
    ignored = ["lm_head", *sorted(n for n, s in schemes.items() if s is None)]
    assert _compressed_tensors_config(default, schemes, ignored) == _library_config(default, schemes, ignored)
