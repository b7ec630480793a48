"""Generic decoder-layer discovery and layer-at-a-time materialisation.

The model is built on the ``meta`` device from its config (no memory). The
Llama family (``LlamaForCausalLM`` and the LLaMA variant, with the RoPE types
of :mod:`quant.llama_layers`) is built by that module in plain torch from
``config.json``, so the quantize process imports neither transformers' model
code nor its config classes, which import ``torch._dynamo``. Any other
``*ForCausalLM`` is built by transformers (and imports ``torch._dynamo``): one
whose decoder layers sit in one ``nn.ModuleList`` of ``num_hidden_layers``
entries works without per-model code (Qwen2, Qwen3, Mistral...). Only the modules
needed at a time get real CPU storage: the embeddings and rotary tables while
the inputs of layer 0 are captured, then one decoder layer in the calibration
dtype (:func:`calibration_dtype`: bfloat16 for a bfloat16 checkpoint, else
float32). Buffers (rotary ``inv_freq``) keep the dtype the model code gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quant import llama_layers
from quant.checkpoint import ShardReader
from quant.errors import QuantInputError


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0: records its inputs and stops the forward pass."""

    def __init__(self):
        super().__init__()
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise QuantInputError("decoder layers called with positional arguments beyond hidden_states are unsupported")
        self.hidden.append(hidden_states.detach())
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Captured


class _Recorder(nn.Module):
    """Stands in for any layer: records its keyword arguments and passes hidden states through."""

    def __init__(self):
        super().__init__()
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.kwargs = kwargs
        return hidden_states


def calibration_dtype(choice: str, reader: ShardReader) -> torch.dtype:
    """``--calib-dtype``: ``auto`` is bfloat16 when most stored matrix bytes are bfloat16, else float32.

    bfloat16 matmuls run 2-2.5x faster than float32 on CPUs with AVX512-BF16/AMX
    and halve the memory of the layer and its activations; it is also the
    precision the checkpoint was made and is served in. float16 checkpoints
    calibrate in float32 (float16 CPU matmuls are slow and overflow-prone).
    """
    if choice != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]
    by_dtype: dict[torch.dtype, int] = {}
    for name in reader.names():
        shape = reader.shape(name)
        if len(shape) == 2:
            dt = reader.dtype(name)
            by_dtype[dt] = by_dtype.get(dt, 0) + shape[0] * shape[1]
    return torch.bfloat16 if by_dtype and max(by_dtype, key=by_dtype.get) == torch.bfloat16 else torch.float32


def check_not_quantized(config_path: Path) -> None:
    """An export of this toolkit (or any quantized checkpoint) as ``--model``: one clear error."""
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise QuantInputError(f"{config_path}: invalid JSON ({exc})") from None
    method = quantization_method(raw)
    if method is not None:
        raise QuantInputError(f"{config_path}: the checkpoint is already quantized (quant_method {method!r}); "
                              "--model takes a float checkpoint")


def quantization_method(config) -> str | None:
    """The ``quant_method`` of a parsed ``config.json`` that carries a ``quantization_config``
    (``"?"`` when it names none), else None: the checkpoint is a float one."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        return None
    return qc.get("quant_method", "?") if isinstance(qc, dict) else "?"


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QuantInputError(f"{path}: invalid JSON ({exc})") from None
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError):
        # The package's own model types (the LLaMA variant) register on demand.
        from models.hf_registration import register_hf_configs

        register_hf_configs()
        try:
            return AutoConfig.from_pretrained(str(model_dir))
        except (ValueError, KeyError):
            raise QuantInputError(
                f"{path}: unsupported architecture {raw.get('architectures')}: transformers does not know "
                f"model_type {raw.get('model_type')!r}") from None


class DecoderSkeleton:
    """A meta-device model plus the names and modules of its decoder layers.

    ``transformers_layers`` builds the model with transformers even where :mod:`quant.llama_layers`
    could (the tests compare both); by default the plain-torch layers are used where they apply.
    """

    def __init__(self, model_dir: Path, reader: ShardReader, dtype: torch.dtype = torch.float32,
                 transformers_layers: bool = False):
        self.dir = Path(model_dir)
        self.reader = reader
        self.dtype = dtype
        where = self.dir / "config.json"
        check_not_quantized(where)
        config = None if transformers_layers else _llama_layers_config(where)
        if config is None:
            config = load_hf_config(self.dir)
            config._attn_implementation = "sdpa"
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForCausalLM") for a in archs):
            raise QuantInputError(f"{where}: unsupported architecture {archs}; expected a *ForCausalLM decoder")
        self.config = config
        try:
            with torch.device("meta"):
                if isinstance(config, llama_layers.LlamaLayersConfig):
                    self.model = llama_layers.LlamaForCausalLM(config, dtype)
                else:
                    from transformers import AutoModelForCausalLM

                    self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QuantInputError(f"{where}: unsupported architecture {archs} ({first})") from None
        self.model.eval()
        text_config = config.get_text_config()
        n = getattr(text_config, "num_hidden_layers", None)
        found = [
            (name, mod) for name, mod in self.model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) == n
            and any(isinstance(m, nn.Linear) for m in mod[0].modules())
        ]
        if len(found) != 1:
            raise QuantInputError(f"{where}: unsupported architecture {archs}: no single list of {n} decoder layers")
        self.layers_prefix, self.layers = found[0]
        self.base_prefix, _, self.layers_attr = self.layers_prefix.rpartition(".")
        self.base = self.model.get_submodule(self.base_prefix) if self.base_prefix else self.model
        # Tied weights (embeddings <-> lm_head): either name may be the stored one.
        self.aliases: dict[str, str] = {}
        tied = getattr(self.model, "_tied_weights_keys", None)
        if isinstance(tied, dict) and getattr(text_config, "tie_word_embeddings", False):
            for a, b in tied.items():
                self.aliases[a], self.aliases[b] = b, a
        experts = [n for n, p in self.layers[0].named_parameters() if p.dim() > 2]
        if experts:
            raise QuantInputError(f"{where}: unsupported architecture {archs}: mixture-of-experts layers "
                                  f"(3-D expert weights such as {self.layer_name(0)}.{experts[0]}) are not supported")
        missing = [k for k in self._layer_keys(0) if k not in reader.entries]
        if missing:
            raise QuantInputError(f"--model {self.dir}: checkpoint lacks {missing[0]} (architecture {archs})")
        self._check_stored_tensors()

    def _check_stored_tensors(self) -> None:
        """Every stored parameter has its config's shape and a float dtype, before any work."""
        for key, t in self.model.state_dict().items():
            stored = key if key in self.reader.entries else self.aliases.get(key)
            if stored in self.reader.entries:
                self.reader.check_tensor(stored, tuple(t.shape), t.is_floating_point())

    @property
    def uses_transformers_layers(self) -> bool:
        return not isinstance(self.model, llama_layers.LlamaForCausalLM)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}"

    def _layer_keys(self, i: int) -> list[str]:
        return [f"{self.layer_name(i)}.{k}" for k in self.layers[i].state_dict()]

    def layer_linears(self, i: int) -> dict[str, nn.Linear]:
        """HF module name -> linear module of layer ``i`` (meta or materialised)."""
        return {f"{self.layer_name(i)}.{n}": m for n, m in self.layers[i].named_modules() if isinstance(m, nn.Linear)}

    def non_layer_linears(self) -> list[str]:
        prefix = self.layers_prefix + "."
        return [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(prefix)]

    def _materialise(self, module: nn.Module, prefix: str) -> None:
        """Give ``module`` CPU storage: its persistent tensors from the checkpoint, the rest recomputed."""
        module.to_empty(device="cpu")
        module.requires_grad_(False)
        persistent = module.state_dict()
        for name, sub in module.named_modules():
            own_buffers = [b for b, _ in sub.named_buffers(recurse=False)]
            if own_buffers and not any(True for _ in sub.parameters(recurse=False)):
                self.model._init_weights(sub)  # rotary tables and other derived buffers
        tensors = {}
        for key in persistent:
            full = f"{prefix}.{key}" if prefix else key
            if full not in self.reader.entries and self.aliases.get(full) in self.reader.entries:
                full = self.aliases[full]
            if full not in self.reader.entries:
                if key.endswith("inv_freq"):
                    continue
                raise QuantInputError(f"--model {self.dir}: checkpoint lacks {full}")
            t = self.reader.read(full)
            if t.is_floating_point():
                if not torch.isfinite(t).all():
                    raise QuantInputError(f"{self.reader.entries[full][0]}: tensor {full} has NaN or Inf values")
                t = t.to(persistent[key].dtype)
            tensors[key] = t
        module.load_state_dict(tensors, strict=False)

    def _direct_embedding_key(self, embed: nn.Module | None) -> str | None:
        """The stored weight of the input embedding when it is a plain ``nn.Embedding`` child of the base model."""
        if type(embed) is not nn.Embedding or embed.max_norm is not None:
            return None
        name = next((n for n, m in self.base.named_children() if m is embed), None)
        if name is None:
            return None
        key = f"{self.base_prefix}.{name}.weight" if self.base_prefix else f"{name}.weight"
        if key not in self.reader.entries:
            key = self.aliases.get(key, key)
        return key if key in self.reader.entries else None

    def capture_layer_inputs(self, samples: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """Run embeddings (and whatever the base model does before layer 0) on ``samples``.

        Returns hidden states ``[n, seqlen, hidden]`` (calibration dtype) and, for each
        decoder layer, the keyword arguments the base model passes to it
        (masks may differ per layer, e.g. sliding-window layers).
        """
        embed = self.model.get_input_embeddings()
        embed_key = self._direct_embedding_key(embed)
        children = [(n, m) for n, m in self.base.named_children()
                    if n != self.layers_attr and not (embed_key and m is embed)]
        for name, child in children:
            self._materialise(child, f"{self.base_prefix}.{name}" if self.base_prefix else name)
        if embed_key:
            # A plain lookup: read only the rows the samples use (the stored values in the
            # calibration dtype, as the embedding would return them) instead of the whole table.
            ids, inverse = torch.unique(samples, return_inverse=True)
            table = self.reader.read_rows(embed_key, ids)
            if table.is_floating_point() and not torch.isfinite(table).all():
                raise QuantInputError(f"{self.reader.entries[embed_key][0]}: tensor {embed_key} has NaN or Inf values")
            table = table.to(self.dtype)

        def inputs(i: int) -> dict:
            if embed_key:
                return {"inputs_embeds": table[inverse[i:i + 1]]}
            return {"input_ids": samples[i:i + 1]}

        originals = list(self.layers)
        catcher = _Catcher()
        recorders = [_Recorder() for _ in originals]
        try:
            with torch.no_grad():
                for i, r in enumerate(recorders):
                    self.layers[i] = r
                self.base(**inputs(0), use_cache=False)
                self.layers[0] = catcher
                for i in range(samples.shape[0]):
                    try:
                        self.base(**inputs(i), use_cache=False)
                    except _Captured:
                        pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            for _, child in children:
                child.to("meta")
        if catcher.kwargs is None or any(r.kwargs is None for r in recorders):
            raise QuantInputError(f"{self.dir / 'config.json'}: the model did not call every decoder layer once")
        first = catcher.hidden[0]
        hidden = torch.empty((len(catcher.hidden), *first.shape[1:]), dtype=first.dtype)
        for i in range(len(catcher.hidden)):  # one copy at a time: never two full sets of activations
            hidden[i:i + 1] = catcher.hidden[i]
            catcher.hidden[i] = None
        per_layer = []
        for r in recorders:
            kwargs = {k: v for k, v in r.kwargs.items() if k not in ("past_key_values", "past_key_value")}
            kwargs["use_cache"] = False
            per_layer.append(kwargs)
        return hidden, per_layer

    def load_layer(self, i: int) -> nn.Module:
        layer = self.layers[i]
        self._materialise(layer, self.layer_name(i))
        return layer

    def unload_layer(self, i: int) -> None:
        self.layers[i].to("meta")

    def layer_tensor_names(self, i: int) -> list[str]:
        return self._layer_keys(i)

    def source_dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name)


def _llama_layers_config(path: Path) -> llama_layers.LlamaLayersConfig | None:
    """The config :mod:`quant.llama_layers` builds the model from, or None: transformers' layers are needed."""
    try:
        return llama_layers.LlamaLayersConfig.from_dict(json.loads(path.read_text()))
    except llama_layers.Unsupported:
        return None


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_tokens: int = 4096) -> torch.Tensor:
    """The layer on every sample, in batches of about ``batch_tokens`` tokens."""
    out = torch.empty_like(hidden)
    step = max(1, batch_tokens // hidden.shape[1])
    with torch.no_grad():
        for s in range(0, hidden.shape[0], step):
            y = layer(hidden[s:s + step], **kwargs)
            out[s:s + step] = y[0] if isinstance(y, tuple) else y
    return out
