"""A multimodal EAGLE-3 drafter for vLLM.

vLLM's own EAGLE-3 drafters read the placeholder token's embedding at image
positions. This one takes the target's multimodal embedding there instead:
it sets ``supports_multimodal_embeddings``, so vLLM's proposer hands it the
target's image embeddings (shifted like the tokens), and merges them in
:meth:`embed_input_ids`. It subclasses vLLM's ``Eagle3LlamaForCausalLM``
because the proposer asserts that type; with a text-only target it computes
exactly what the parent computes.

Extra config flags (top level or under ``eagle_config``), both default off:

- ``input_embeds_norm``: an RMSNorm (``embed_norm.weight``) on the input
  embeddings, token or image, before the decoder layer;
- ``fused_hidden_norm``: an RMSNorm (``fused_norm.weight``) on the fused
  target hidden states, after ``fc``.

M-RoPE: the drafter builds its rotary embedding from its own config, so a
draft config carrying the target's ``rope_parameters`` (with
``mrope_section``) makes vLLM feed it M-RoPE positions.

Weights load from the three standard layouts (see :mod:`eagle.layouts`):
the EAGLE authors' and SpecForge's ``midlayer.*`` and speculators'
``layers.0.*``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    _merge_multimodal_embeddings,
    process_eagle_weight,
)
from vllm.multimodal.inputs import NestedTensors

from eagle.checks import check_d2t, check_drafter, check_finite, eagle_field
from eagle.layouts import canonical_name


class Eagle3MultimodalLlamaForCausalLM(Eagle3LlamaForCausalLM):
    """EAGLE-3 drafter whose input embeddings at image positions are the
    target's image embeddings."""

    supports_multimodal_embeddings: ClassVar[Literal[True]] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        spec = vllm_config.speculative_config
        assert spec is not None and spec.draft_model_config is not None
        config = spec.draft_model_config.hf_config
        target = vllm_config.model_config
        self._where = f"{spec.draft_model_config.model}/config.json"
        self._target_vocab_size = target.get_vocab_size()
        check_drafter(
            config,
            target_hidden_size=target.get_hidden_size(),
            target_vocab_size=self._target_vocab_size,
            target_layers=target.get_total_num_hidden_layers(),
            where=self._where,
        )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        eps = config.rms_norm_eps
        self.model.embed_norm = (
            RMSNorm(config.hidden_size, eps=eps)
            if eagle_field(config, "input_embeds_norm", False) else None
        )
        self.model.fused_norm = (
            RMSNorm(config.hidden_size, eps=eps)
            if eagle_field(config, "fused_hidden_norm", False) else None
        )

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: NestedTensors | None = None,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings, with the target's multimodal embeddings written
        over the positions where ``is_multimodal`` is set."""
        if multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return self.model.embed_input_ids(input_ids)
        # Placeholder ids may lie outside the vocabulary: embed id 0 there.
        mask = is_multimodal.to(device=input_ids.device)
        embeds = self.model.embed_input_ids(input_ids.masked_fill(mask, 0))
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model.embed_norm is not None:
            if inputs_embeds is None:
                inputs_embeds = self.model.embed_input_ids(input_ids)
            inputs_embeds = self.model.embed_norm(inputs_embeds)
        return self.model(input_ids, positions, hidden_states, inputs_embeds)

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = super().combine_hidden_states(hidden_states)
        if self.model.fused_norm is not None:
            fused = self.model.fused_norm(fused)
        return fused

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load any of the three layouts; return the loaded parameter names."""
        model_weights: dict[str, torch.Tensor] = {}
        for raw_name, tensor in weights:
            check_finite([(raw_name, tensor)], self._where.replace("config.json", "weights"))
            name = canonical_name(raw_name)
            if name is None or name == "t2d":
                continue
            if name == "d2t":
                if self.draft_id_to_target_id is None:
                    continue  # full vocabulary: identity mapping
                check_d2t(tensor, self._target_vocab_size, self._where.replace("config.json", "weights"))
                if tensor.numel() != self.draft_id_to_target_id.numel():
                    raise ValueError(
                        f"{self._where}: d2t has {tensor.numel()} entries but draft_vocab_size "
                        f"is {self.draft_id_to_target_id.numel()}"
                    )
                name = "draft_id_to_target_id"
            elif not name.startswith("lm_head"):
                name = "model." + name
            model_weights[name] = tensor
            process_eagle_weight(self, name)

        if self.draft_id_to_target_id is not None and "draft_id_to_target_id" not in model_weights:
            raise ValueError(
                f"{self._where}: draft_vocab_size {self.config.draft_vocab_size} is smaller "
                "than the target's vocabulary but the checkpoint has no d2t tensor"
            )
        skip = {"mask_hidden": None}
        if "model.embed_tokens.weight" not in model_weights:
            skip["embed_tokens"] = None
        if not self.model.norm_before_fc:
            skip["input_norm."] = None
        if self.draft_id_to_target_id is not None and "lm_head.weight" not in model_weights:
            raise ValueError(
                f"{self._where}: a reduced draft vocabulary needs the drafter's own lm_head"
            )
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(
            model_weights.items(), mapper=WeightsMapper(orig_to_new_substr=skip)
        )
        # A drafter checkpoint may leave out the embeddings and (with the full
        # vocabulary) the lm_head: vLLM's proposer then shares the target's.
        for name, _ in self.named_parameters():
            if (name.startswith("model.embed_tokens.") and not self.has_own_embed_tokens) or (
                name.startswith("lm_head.") and not self.has_own_lm_head
            ):
                loaded.add(name)
        return loaded
