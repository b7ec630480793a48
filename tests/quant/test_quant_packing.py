"""Packing layouts as contracts: exact round trips, and agreement with vLLM's and compressed-tensors' own code."""

from __future__ import annotations

import pytest
import torch

from quant.packing import (gptq_qzeros, pack_int4_along_input, pack_int4_gptq, unpack_gptq_qzeros,
                           unpack_int4_along_input, unpack_int4_gptq)


def _random_int4(out_f=24, in_f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    q[0, :8] = torch.tensor([-8, 7, 0, -1, 1, -8, 7, 3], dtype=torch.int8)  # both extremes, sign bit of a word
    return q


def test_native_and_ct_layout_round_trip_and_bit_positions():
    q = _random_int4()
    packed = pack_int4_along_input(q)
    assert packed.dtype == torch.int32 and packed.shape == (24, 8)
    assert torch.equal(unpack_int4_along_input(packed), q)
    # Word [0, 0] holds inputs 0..7 of row 0, low nibble first, stored as q + 8.
    expected = sum(((int(v) + 8) << (4 * j)) for j, v in enumerate(q[0, :8]))
    assert int(packed[0, 0]) & 0xFFFFFFFF == expected


def test_gptq_layout_round_trip_and_transpose():
    q = _random_int4(out_f=16, in_f=40)
    qweight = pack_int4_gptq(q)
    assert qweight.shape == (5, 16) and qweight.dtype == torch.int32
    assert torch.equal(unpack_int4_gptq(qweight), q)
    assert torch.equal(qweight, pack_int4_along_input(q).t())


def test_gptq_qzeros_are_all_0x77777777():
    z = gptq_qzeros(3, 32)
    assert z.shape == (3, 4) and z.dtype == torch.int32
    assert all(int(w) & 0xFFFFFFFF == 0x77777777 for w in z.flatten())
    assert torch.equal(unpack_gptq_qzeros(z), torch.full((3, 32), 7, dtype=torch.int64))


def test_packing_rejects_out_of_range_and_ragged():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_along_input(torch.full((2, 8), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4_along_input(torch.zeros((2, 12), dtype=torch.int8))


def test_layouts_match_vllm_unpack_helpers():
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        gptq_pack, pack_quantized_values_into_int32, unpack_cols, unpack_quantized_values_into_int32)
    from vllm.scalar_type import scalar_types

    q = _random_int4(out_f=32, in_f=64)
    u = (q.to(torch.int32) + 8)  # vLLM's uint4b8: stored value = q + 8
    # GPTQ qweight [in/8, out]: vLLM packs along dim 0 of the [in, out] matrix.
    assert torch.equal(pack_int4_gptq(q), gptq_pack(u.t().contiguous(), 4, 64, 32))
    assert torch.equal(unpack_quantized_values_into_int32(pack_int4_gptq(q), scalar_types.uint4b8, packed_dim=0),
                       u.t())
    # Native / compressed-tensors [out, in/8]: packed along the last dim.
    native = pack_int4_along_input(q)
    assert torch.equal(native, pack_quantized_values_into_int32(u, scalar_types.uint4b8, packed_dim=1))
    assert torch.equal(unpack_cols(native, 4, 32, 64), u)
    # qzeros [groups, out/8] packed along the output dim.
    assert torch.equal(unpack_cols(gptq_qzeros(2, 32), 4, 2, 32), torch.full((2, 32), 7, dtype=torch.int32))


def test_ct_layout_matches_compressed_tensors_library():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = _random_int4(out_f=16, in_f=128)
    assert torch.equal(pack_int4_along_input(q), pack_to_int32(q, 4))
    assert torch.equal(unpack_from_int32(pack_int4_along_input(q), 4, torch.Size(q.shape)), q)
