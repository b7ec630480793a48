"""vLLM class for the tiny LLaVA-style target of :mod:`models.tiny_vlm`.

vLLM's own ``llava.py`` cannot be imported without torchvision (it pulls in
the Pixtral image processor), so this is a small LLaVA built from vLLM's
importable parts: ``CLIPVisionModel``, a two-layer projector and a Llama
language model, with a multimodal processor that expands each ``<image>``
into one placeholder per vision patch. It implements what vLLM's EAGLE
proposer needs of a multimodal target: ``image_token_index`` in the config,
``get_language_model()``, and ``SupportsEagle3`` (aux hidden states).
Only the ``default`` feature strategy (drop CLS) and one feature layer
(the last) are supported, which is what :func:`build_tiny_llava` writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from transformers import BatchFeature
from transformers.models.llava import LlavaProcessor
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPEncoderInfo, CLIPVisionModel
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsEagle3,
    SupportsMultiModal,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors


class TinyLlavaProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return self.ctx.get_hf_processor(LlavaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def encoder_info(self) -> CLIPEncoderInfo:
        return CLIPEncoderInfo(self.get_hf_config())

    def get_num_image_tokens(self) -> int:
        # "default" strategy: the CLS token is dropped.
        return self.encoder_info().get_patch_grid_length() ** 2

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]):
        return {"image": self.get_num_image_tokens()}


class TinyLlavaDummyInputsBuilder(BaseDummyInputsBuilder[TinyLlavaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions):
        size = self.info.encoder_info().get_image_size()
        return {"image": self._get_dummy_images(
            width=size, height=size, num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )}


class TinyLlavaMultiModalProcessor(BaseMultiModalProcessor[TinyLlavaProcessingInfo]):
    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs):
        return dict(pixel_values=MultiModalFieldConfig.batched("image"))

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        token = self.info.get_hf_config().image_token_index
        n = self.info.get_num_image_tokens()
        return [PromptReplacement(modality="image", target=[token], replacement=[token] * n)]


class TinyLlavaProjector(nn.Module):
    def __init__(self, vision_size: int, text_size: int, act: str, prefix: str = ""):
        super().__init__()
        self.linear_1 = ColumnParallelLinear(vision_size, text_size, bias=True,
                                             prefix=maybe_prefix(prefix, "linear_1"))
        self.act = get_act_fn(act)
        self.linear_2 = RowParallelLinear(text_size, text_size, bias=True,
                                          prefix=maybe_prefix(prefix, "linear_2"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_1(x)
        x, _ = self.linear_2(self.act(x))
        return x


@MULTIMODAL_REGISTRY.register_processor(
    TinyLlavaMultiModalProcessor,
    info=TinyLlavaProcessingInfo,
    dummy_inputs=TinyLlavaDummyInputsBuilder,
)
class TinyLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsEagle3):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # transformers 5 saves the CLIP tower without its ``vision_model.`` level.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "vision_tower.": "vision_tower.vision_model.",
        "lm_head.": "language_model.lm_head.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"{vllm_config.model_config.model}/config.json: only "
                             "vision_feature_select_strategy 'default' is supported")
        self.config = config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_index])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionModel(
                config.vision_config, require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.multi_modal_projector = TinyLlavaProjector(
                config.vision_config.hidden_size, config.text_config.hidden_size,
                config.projector_hidden_act, prefix=maybe_prefix(prefix, "multi_modal_projector"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, list):
            pixel_values = torch.stack(pixel_values)
        features = self.vision_tower(pixel_values, feature_select_strategy="default")
        return self.multi_modal_projector(features)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
