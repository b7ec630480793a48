"""Validation of an EAGLE-3 drafter against its target, as pure functions.

Used by the vLLM drafter class when an engine builds it, by the layout
readers and by ``train-drafter``. Every failure is one :class:`DrafterError`
whose message names the file (or flag) at fault.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DrafterError(ValueError):
    """A drafter checkpoint or option that cannot work with its target."""


def eagle_field(config, key: str, default=None):
    """``key`` from a draft config, top level first, then ``eagle_config``."""
    value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
    if value is not None:
        return value
    eagle = getattr(config, "eagle_config", None) if not isinstance(config, dict) \
        else config.get("eagle_config")
    if isinstance(eagle, dict) and eagle.get(key) is not None:
        return eagle[key]
    return default


def check_aux_layer_ids(layer_ids: Sequence[int], target_layers: int, where: str) -> None:
    """Aux ids follow vLLM's ``SupportsEagle3``: id ``i`` is the residual
    stream entering decoder layer ``i`` (0 = embeddings, ``target_layers`` =
    the last layer's output before the final norm). Ids must be distinct,
    because vLLM's target appends each layer's state once."""
    ids = list(layer_ids)
    bad = [i for i in ids if not isinstance(i, int) or i < 0 or i > target_layers]
    if bad:
        raise DrafterError(
            f"{where}: aux hidden state layer id(s) {bad} are beyond the target's depth "
            f"(the target has {target_layers} layers, so ids must be in 0..{target_layers})"
        )
    if len(set(ids)) != len(ids):
        raise DrafterError(f"{where}: aux hidden state layer ids {ids} repeat a layer")


def check_vocab(draft_vocab_size: int, target_vocab_size: int, where: str) -> None:
    if draft_vocab_size > target_vocab_size:
        raise DrafterError(
            f"{where}: draft vocabulary size {draft_vocab_size} is larger than the "
            f"target's vocabulary ({target_vocab_size})"
        )
    if draft_vocab_size < 1:
        raise DrafterError(f"{where}: draft vocabulary size must be positive")


def check_hidden_sizes(draft_config, target_hidden_size: int, where: str) -> None:
    """The drafter's width must equal the target's: it reads the target's
    token (and image) embeddings, and its ``fc`` reads target hidden states."""
    hidden = eagle_field(draft_config, "hidden_size")
    if hidden != target_hidden_size:
        raise DrafterError(
            f"{where}: hidden_size {hidden} does not match the target's hidden size "
            f"{target_hidden_size}"
        )
    tgt = eagle_field(draft_config, "target_hidden_size")
    if tgt is not None and tgt != target_hidden_size:
        raise DrafterError(
            f"{where}: target_hidden_size {tgt} does not match the target's hidden size "
            f"{target_hidden_size}"
        )


def check_d2t(d2t: torch.Tensor, target_vocab_size: int, where: str) -> None:
    """``d2t`` holds offsets: draft id ``i`` is target id ``i + d2t[i]``."""
    if d2t.dim() != 1:
        raise DrafterError(f"{where}: d2t must be 1-D, got shape {tuple(d2t.shape)}")
    if d2t.dtype.is_floating_point:
        raise DrafterError(f"{where}: d2t must be an integer tensor, got {d2t.dtype}")
    targets = torch.arange(d2t.numel(), dtype=torch.long) + d2t.long()
    bad = ((targets < 0) | (targets >= target_vocab_size)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise DrafterError(
            f"{where}: d2t is out of range: draft id {i} maps to target id "
            f"{int(targets[i])}, outside the target vocabulary 0..{target_vocab_size - 1} "
            f"({bad.numel()} such entries)"
        )
    if torch.unique(targets).numel() != targets.numel():
        raise DrafterError(f"{where}: d2t maps two draft ids to the same target id")


def check_finite(tensors, where: str) -> None:
    """No NaN or Inf in any float tensor of ``tensors`` (name -> tensor, or (name, tensor) pairs)."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, t in items:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DrafterError(f"{where}: tensor {name} has NaN or Inf values")


def check_target_checkpoint(target) -> None:
    """A drafter is trained against the float target: a quantized export is refused (transformers
    would load none of its linear weights and train against a random model)."""
    import json
    from pathlib import Path

    path = Path(target) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DrafterError(f"--target {path}: cannot read the config ({exc})") from None
    from quant.model import quantization_method

    method = quantization_method(raw)
    if method is not None:
        raise DrafterError(f"--target {target}: a quantized checkpoint (quant_method {method!r}); train the "
                           "drafter against the float checkpoint it was made from")


def check_drafter(
    draft_config,
    *,
    target_hidden_size: int,
    target_vocab_size: int,
    target_layers: int,
    where: str,
) -> None:
    """All checks that need only the draft config and the target's shape."""
    vocab = eagle_field(draft_config, "vocab_size")
    if vocab is not None and vocab != target_vocab_size:
        raise DrafterError(
            f"{where}: vocab_size {vocab} differs from the target's vocabulary "
            f"({target_vocab_size})"
        )
    draft_vocab = eagle_field(draft_config, "draft_vocab_size") or target_vocab_size
    check_vocab(draft_vocab, target_vocab_size, where)
    check_hidden_sizes(draft_config, target_hidden_size, where)
    ids = eagle_field(draft_config, "eagle_aux_hidden_state_layer_ids")
    if ids is not None:
        check_aux_layer_ids(ids, target_layers, where)
