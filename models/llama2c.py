"""Read karpathy/llama2.c checkpoints (``.bin``, version 0) and tokenizers.

Checkpoint layout (``export.py`` legacy format): a header of 7 int32
``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``
(a negative ``vocab_size`` means the classifier is not shared with the
embedding), then fp32 tensors: embedding, per-layer attention norms, wq, wk,
wv, wo, FFN norms, w1, w2, w3, the final norm, the RoPE cos and sin tables
``[seq_len, head_size / 2]``, and the classifier if not shared. Linear
weights are stored ``[out, in]`` like ``nn.Linear``.

llama2.c rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` of each head;
transformers rotates halves ``(x_i, x_{i + d/2})``. Permuting the output
rows of wq and wk per head (evens first, then odds) makes the two equal.

Tokenizer layout (``tokenizer.py`` export): int32 ``max_token_length``, then
per token a float32 score, an int32 byte length and the UTF-8 bytes, with
sentencepiece's ``▁`` written as a space and BOS/EOS as ``"\\n<s>\\n"`` /
``"\\n</s>\\n"``. It is rebuilt as a byte-fallback BPE ``tokenizer.json``
whose merges follow the pieces' scores, as sentencepiece's BPE does.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<7i")
NORM_EPS = 1e-5  # llama2.c's RMSNorm epsilon (model.py ModelArgs.norm_eps)
SPACE = "\u2581"  # sentencepiece's whitespace marker
UNK, BOS, EOS = "<unk>", "<s>", "</s>"


class Llama2cError(ValueError):
    """The file is not a llama2.c checkpoint or tokenizer this reader accepts."""


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        L, d, h, hs = self.n_layers, self.dim, self.hidden_dim, self.head_size
        kv = self.n_kv_heads * hs
        shapes = [
            ("tok_embeddings", (self.vocab_size, d)),
            ("attention_norm", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("ffn_norm", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("norm", (d,)),
            ("freqs_cos", (self.seq_len, hs // 2)),
            ("freqs_sin", (self.seq_len, hs // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("output", (self.vocab_size, d)))
        return shapes


def read_header(path: Path) -> Llama2cHeader:
    raw = Path(path).read_bytes()[: HEADER.size]
    if len(raw) < HEADER.size:
        raise Llama2cError(f"{path}: too short for a llama2.c header")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack(raw)
    header = Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise Llama2cError(f"{path}: not a llama2.c v0 checkpoint (header {HEADER.unpack(raw)})")
    if header.head_size % 2:
        raise Llama2cError(f"{path}: head size {header.head_size} is odd")
    return header


def read_tensors(path: Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """The header and every tensor of a llama2.c v0 checkpoint, as float32 arrays."""
    header = read_header(path)
    shapes = header.tensor_shapes()
    expected = HEADER.size + 4 * sum(math.prod(s) for _, s in shapes)
    size = Path(path).stat().st_size
    if size != expected:
        raise Llama2cError(
            f"{path}: {size} bytes, but a llama2.c v0 checkpoint with header {header} has {expected}"
        )
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    tensors, offset = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        tensors[name] = data[offset:offset + n].reshape(shape)
        offset += n
    return header, tensors


def rope_theta(header: Llama2cHeader, tensors: dict[str, np.ndarray]) -> float:
    """The RoPE base that produced the checkpoint's cos/sin tables (checked on the whole table)."""
    hs = header.head_size
    angle = math.atan2(float(tensors["freqs_sin"][1, 1]), float(tensors["freqs_cos"][1, 1]))
    theta = float(round(angle ** (-hs / 2.0)))  # angle = theta ** (-2 / hs)
    inv_freq = theta ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)
    freqs = np.outer(np.arange(header.seq_len), inv_freq)
    if not (np.allclose(np.cos(freqs), tensors["freqs_cos"], atol=1e-4)
            and np.allclose(np.sin(freqs), tensors["freqs_sin"], atol=1e-4)):
        raise Llama2cError(f"the RoPE tables are not standard RoPE with any base (best guess {theta})")
    return theta


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of wq/wk from interleaved-pair to half-split RoPE."""
    out_dim, in_dim = w.shape
    hs = out_dim // n_heads
    return w.reshape(n_heads, hs // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def hf_state_dict(header: Llama2cHeader, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF Llama tensor names and layouts (q/k rows permuted for half-split RoPE)."""
    sd = {"model.embed_tokens.weight": tensors["tok_embeddings"], "model.norm.weight": tensors["norm"]}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = tensors["attention_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = unpermute_rope_rows(tensors["wq"][i], header.n_heads)
        sd[p + "self_attn.k_proj.weight"] = unpermute_rope_rows(tensors["wk"][i], header.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = tensors["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = tensors["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = tensors["ffn_norm"][i]
        sd[p + "mlp.gate_proj.weight"] = tensors["w1"][i]
        sd[p + "mlp.down_proj.weight"] = tensors["w2"][i]
        sd[p + "mlp.up_proj.weight"] = tensors["w3"][i]
    sd["lm_head.weight"] = tensors["tok_embeddings"] if header.shared_classifier else tensors["output"]
    return sd


def read_tokenizer(path: Path, vocab_size: int) -> list[tuple[str, float]]:
    """``(piece, score)`` per token id, with sentencepiece's ``▁`` restored."""
    raw = Path(path).read_bytes()
    if len(raw) < 4:
        raise Llama2cError(f"{path}: too short for a llama2.c tokenizer")
    offset, pieces = 4, []
    try:
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            if length < 0 or offset + length > len(raw):
                raise Llama2cError(f"{path}: token {len(pieces)} runs past the end of the file")
            pieces.append((raw[offset:offset + length].decode("utf-8"), score))
            offset += length
    except (struct.error, UnicodeDecodeError) as exc:
        raise Llama2cError(f"{path}: not a llama2.c tokenizer for {vocab_size} tokens ({exc})") from exc
    if offset != len(raw):
        raise Llama2cError(f"{path}: {len(raw) - offset} bytes left after {vocab_size} tokens")
    specials = {"\n<s>\n": BOS, "\n</s>\n": EOS}
    return [(specials.get(t, t if t == UNK else t.replace(" ", SPACE)), s) for t, s in pieces]


def build_tokenizer(pieces: list[tuple[str, float]], model_max_length: int):
    """A ``PreTrainedTokenizerFast`` equivalent to the sentencepiece BPE model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    for name in (UNK, BOS, EOS):
        if name not in vocab:
            raise Llama2cError(f"tokenizer has no {name!r} token")
    is_byte = lambda p: len(p) == 6 and p.startswith("<0x") and p.endswith(">")  # noqa: E731
    merges = []
    for piece, score in pieces:
        if piece in (UNK, BOS, EOS) or is_byte(piece) or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [s for s in splits if s[0] in vocab and s[1] in vocab]
        merges += [(left, right, score) for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    merges.sort(key=lambda m: m[2], reverse=True)  # higher score merges first (stable on ties)

    tok = Tokenizer(models.BPE(
        vocab=vocab, merges=[(a, b) for a, b, _ in merges],
        unk_token=UNK, byte_fallback=True, fuse_unk=True,
    ))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([UNK, BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    return fast
