"""Gemma 4 vision-language model on megatron-core parts, computed from config + state dict only.

Twin of HF's ``Gemma4ForConditionalGeneration`` (``transformers/models/gemma4/modeling_gemma4.py``):

    ids' = where(ids is an image/video/audio placeholder, pad_id, ids)      # placeholders -> pad id
    emb  = language_model.embedding(ids')                                   # x round(sqrt(H)) as HF
    img  = vision(pixel_values, image_position_ids)                         # tower + embed_vision, [n, H]
    emb  = image_scatter(emb, img, ids == image_id)                         # masked_scatter, no sqrt(H)
    aud  = audio(input_features, input_features_mask)                      # tower + embed_audio, real frames
    emb  = audio_scatter(emb, aud, ids == audio_id)                         # after the images, as HF merges
    logits = language_model(ids', inputs_embeds=emb, position_ids, padding_mask, mm_token_type_ids)  # ids': PLE

The language model builds its own masks from the raw ``mm_token_type_ids`` (sliding layers: the vision
bidirectional rule, full layers: causal; ``parity.models.masks``) and its own RoPE tables; those masks
really reach attention (``Gemma4CoreAttention`` takes an explicit mask). ``ImageScatter`` is a module of
its own so the merged embeddings have a hookable Megatron twin (the audio scatter's output, when the model has
an audio tower).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parity import compat

compat.apply()

from megatron.core.transformer.module import MegatronModule  # noqa: E402

from parity.config import TextArgs  # noqa: E402
from parity.models.text import Gemma4Model  # noqa: E402
from parity.models.vision import Gemma4VisionTowerMC  # noqa: E402
from parity.vlm_config import AudioArgs, VisionArgs  # noqa: E402


class ImageScatter(nn.Module):
    """``inputs_embeds.masked_scatter(image_mask, image_features)``: image (or audio) features (cast to the
    embedding dtype, not scaled) fill the placeholder rows in order (sequence 0 first, left to right)."""

    def __init__(self, what: str = "image"):
        super().__init__()
        self.what = what

    def forward(self, inputs_embeds: torch.Tensor, image_features: torch.Tensor,
                image_mask: torch.Tensor) -> torch.Tensor:
        n_tokens = int(image_mask.sum())
        if n_tokens * inputs_embeds.shape[-1] != image_features.numel():
            raise ValueError(f"{self.what} features and {self.what} tokens do not match: {n_tokens} tokens, "
                             f"{image_features.shape[0]} features")
        mask = image_mask[..., None].expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))


class Gemma4VLModel(MegatronModule):
    """Megatron Gemma 4 VLM: ``.vision`` (tower + embed_vision), ``.image_scatter``, with an audio config
    ``.audio`` (tower + embed_audio) and ``.audio_scatter``, then ``.language_model``.

    ``image_token_id`` marks the rows the image features fill; every id in ``placeholder_ids`` (image, video,
    audio placeholders) is replaced by the pad id before the embedding lookup, as HF does.
    """

    def __init__(self, text_args: TextArgs, vision_args: VisionArgs, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", *, image_token_id: int, placeholder_ids: tuple[int, ...] = (),
                 audio_args: AudioArgs | None = None, audio_token_id: int | None = None):
        language_model = Gemma4Model(text_args, dtype=dtype, device=device)
        super().__init__(config=language_model.config)
        self.text_args, self.vision_args = text_args, vision_args
        self.image_token_id = int(image_token_id)
        self.placeholder_ids = tuple(sorted({self.image_token_id, *(int(i) for i in placeholder_ids)}))
        self.vision = Gemma4VisionTowerMC(vision_args, params_dtype=dtype)
        self.image_scatter = ImageScatter()
        self.audio_args, self.audio_token_id = audio_args, audio_token_id
        if audio_args is not None:
            from parity.models.audio import Gemma4AudioTowerMC

            self.audio = Gemma4AudioTowerMC(audio_args, params_dtype=dtype)
            self.audio_scatter = ImageScatter("audio")
        self.language_model = language_model
        if device != "cpu":
            self.vision.to(device)
            if audio_args is not None:
                self.audio.to(device)

    @classmethod
    def from_hf_config(cls, config: Any, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "Gemma4VLModel":
        """Read an HF ``Gemma4Config`` once into flat args (the model never holds the HF config)."""
        placeholders = [getattr(config, k, None) for k in ("image_token_id", "video_token_id", "audio_token_id")]
        audio = AudioArgs.from_hf(config) if getattr(config, "audio_config", None) is not None else None
        return cls(TextArgs.from_hf(config.text_config), VisionArgs.from_hf(config), dtype=dtype, device=device,
                   image_token_id=config.image_token_id, placeholder_ids=tuple(i for i in placeholders if i is not None),
                   audio_args=audio, audio_token_id=config.audio_token_id if audio is not None else None)

    def text_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Placeholder ids -> pad id (HF: "replace image id with PAD", so the lookup never sees them)."""
        placeholders = torch.tensor(self.placeholder_ids, device=input_ids.device)
        pad = self.text_args.pad_token_id or 0
        return torch.where(torch.isin(input_ids, placeholders), torch.full_like(input_ids, pad), input_ids)

    def merge_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                         image_position_ids: torch.Tensor | None, input_features: torch.Tensor | None = None,
                         input_features_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with the image features scattered into the image-token rows, then the audio soft
        tokens into the audio-token rows: ``[b, s, H]``."""
        embeds = self.language_model.embedding(self.text_ids(input_ids))
        if pixel_values is not None:
            features = self.vision(pixel_values.to(embeds.device), image_position_ids.to(embeds.device))
            embeds = self.image_scatter(embeds, features, input_ids == self.image_token_id)
        if input_features is not None and input_features_mask is not None and self.audio_args is not None:
            audio = self.audio(input_features.to(embeds.device), input_features_mask.to(embeds.device))
            embeds = self.audio_scatter(embeds, audio, input_ids == self.audio_token_id)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, input_features_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Softcapped logits ``[b, s, V]``. ``attention_mask`` is the 2-D padding mask (1 = real token)."""
        embeds = self.merge_embeddings(input_ids, pixel_values, image_position_ids, input_features,
                                       input_features_mask)
        # the text ids too: per-layer embeddings (PLE) look up the placeholders' rows as the pad token's, and project
        # the merged embeddings (image and audio features at their rows), as HF's Gemma4Model passes them on
        return self.language_model(input_ids=self.text_ids(input_ids), inputs_embeds=embeds,
                                   position_ids=position_ids, padding_mask=attention_mask,
                                   mm_token_type_ids=mm_token_type_ids)
