"""Raw VLM inputs laid out as ``Gemma4Processor`` lays them out, built in-process from seeded synthetic images.

The real image processor needs torchvision or Pillow; it is followed step by step instead
(``transformers/models/gemma4/image_processing_gemma4.py``, 5.24):
1. aspect-ratio-preserving resize to the largest size with H, W multiples of ``k*p`` and at most
   ``max_soft_tokens * k^2`` patches -- here the random image is *drawn* at that target size (resizing
   noise gives noise; this is the one skipped step);
2. rescale uint8 by 1/255, no normalisation (the model computes ``2 * (pv - 0.5)`` itself);
3. patchify: ``(C, H, W) -> (ph, pw, p, p, C)``, one row per patch in row-major patch order, each row
   ordered (py, px, c);
4. positions ``(x, y)`` = (column, row) of each patch;
5. pad every image to ``max_patches`` rows: pixels 0, positions (-1, -1).
Text follows ``Gemma4Processor.replace_image_token``: each image becomes ``BOI, IMAGE * n_soft, EOI``;
``mm_token_type_ids`` is 1 on image tokens only (BOI/EOI are text). Sequences are right-padded.

Audio (a config with an ``audio_config``): each clip is a seeded synthetic waveform (a few tones with noise,
16 kHz) of the case's duration, run through HF's own ``Gemma4AudioFeatureExtractor`` (numpy only: padding to
the longest clip rounded up to 128 samples, semicausal STFT framing, 128 log-mel bins, the frame mask, padded
frames zeroed) -- raw inputs both sides share. Text follows ``Gemma4Processor.replace_audio_token``: each clip
becomes ``BOA, AUDIO * n, EOA`` after the sequence's images, ``n`` the real frames left after the two
stride-2 blocks the processor simulates on the mask; ``mm_token_type_ids`` is 3 on audio tokens (the
processor's ``create_mm_token_type_ids``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

# Source (height, width) of each image, per sequence: two images in sequence 0, one in sequence 1.
DEFAULT_IMAGE_SIZES = (((60, 90), (90, 45)), ((50, 50),))
# Text tokens before the first image, between images and after the last one, per sequence.
DEFAULT_TEXT_RUNS = ((5, 4, 6), (7, 9))
DEFAULT_MAX_SOFT_TOKENS = 70  # one of HF's supported values (70, 140, 280, 560, 1120)
SAMPLING_RATE = 16_000  # Gemma4AudioFeatureExtractor's default


def audio_tokens(mask: torch.Tensor) -> torch.Tensor:
    """``[A, T]`` frame mask -> the real frames after the two stride-2 subsampling blocks, as
    ``Gemma4Processor.replace_audio_token`` simulates them (each keeps every other frame)."""
    for _ in range(2):
        mask = mask[:, ::2]
    return mask


def process_audio(durations_ms: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Seeded synthetic clips of ``durations_ms`` -> HF's feature extractor -> ``input_features [A, T, 128]``
    (float32) and ``input_features_mask [A, T]`` (bool)."""
    import numpy as np
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(seed)
    clips = []
    for ms in durations_ms:
        t = np.arange(ms * SAMPLING_RATE // 1000) / SAMPLING_RATE
        tones = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 4000) * t + rng.uniform(0, 6.3))
                    for _ in range(4))
        clips.append((tones + 0.02 * rng.standard_normal(t.shape)).astype(np.float32))
    out = Gemma4AudioFeatureExtractor()(clips, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    return dict(input_features=out["input_features"].float(), input_features_mask=out["input_features_mask"].bool())


def aspect_ratio_preserving_size(height: int, width: int, patch_size: int, max_patches: int,
                                 pooling_kernel_size: int) -> tuple[int, int]:
    """Target (H, W) of the processor's resize: same arithmetic as HF's ``get_aspect_ratio_preserving_size``."""
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    side = pooling_kernel_size * patch_size
    th, tw = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ValueError(f"{height}x{width} resizes to 0x0")
    max_side = (max_patches // pooling_kernel_size**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, max_side)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, max_side), side
    if th * tw > max_patches * patch_size**2:
        raise ValueError(f"{height}x{width} -> {th}x{tw} exceeds {max_patches} patches")
    return th, tw


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[C, H, W] -> [ph * pw, p * p * C]``: patches row-major, values ordered (py, px, c)."""
    c, h, w = image.shape
    p = patch_size
    return image.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape((h // p) * (w // p), -1)


def patch_positions(patches_high: int, patches_wide: int) -> torch.Tensor:
    """``[ph * pw, 2]`` (x, y) of each patch, in patchify's order."""
    y, x = torch.meshgrid(torch.arange(patches_high), torch.arange(patches_wide), indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


def process_images(images: list[torch.Tensor], *, patch_size: int, pooling_kernel_size: int,
                   max_soft_tokens: int) -> dict[str, Any]:
    """uint8 ``[3, H, W]`` images (already at their target size) -> ``pixel_values [I, max_patches, 3p^2]``,
    ``image_position_ids [I, max_patches, 2]`` and ``num_soft_tokens_per_image``."""
    max_patches = max_soft_tokens * pooling_kernel_size**2
    pixel_values, positions, soft = [], [], []
    for image in images:
        p = patch_size
        patches = patchify(image.float() * (1 / 255), p)
        pos = patch_positions(image.shape[1] // p, image.shape[2] // p)
        soft.append(patches.shape[0] // pooling_kernel_size**2)
        pad = max_patches - patches.shape[0]
        pixel_values.append(torch.nn.functional.pad(patches, (0, 0, 0, pad), value=0.0))
        positions.append(torch.nn.functional.pad(pos, (0, 0, 0, pad), value=-1))
    return dict(pixel_values=torch.stack(pixel_values), image_position_ids=torch.stack(positions),
                num_soft_tokens_per_image=soft)


def build_vlm_inputs(config: Any, *, seed: int = 0, image_sizes=DEFAULT_IMAGE_SIZES,
                     text_runs=DEFAULT_TEXT_RUNS, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS,
                     audio_ms=None) -> dict[str, torch.Tensor]:
    """Raw inputs for an HF ``Gemma4Config``: ``input_ids``, ``attention_mask`` (2-D, 1 = real token),
    ``position_ids``, ``mm_token_type_ids``, ``pixel_values`` (float32), ``image_position_ids``; with
    ``audio_ms`` (clip durations per sequence) ``input_features`` and ``input_features_mask`` too. Images and
    clips of all sequences are flattened in order (sequence 0's first)."""
    vision, text = config.vision_config, config.text_config
    p, k = vision.patch_size, vision.pooling_kernel_size
    gen = torch.Generator().manual_seed(seed)
    images = []
    for sizes in image_sizes:
        for h, w in sizes:
            th, tw = aspect_ratio_preserving_size(h, w, p, max_soft_tokens * k * k, k)
            if max(th, tw) // p > vision.position_embedding_size:
                raise ValueError(f"{th}x{tw} has more patches per side than position_embedding_size")
            images.append(torch.randint(0, 256, (3, th, tw), generator=gen, dtype=torch.uint8))
    processed = process_images(images, patch_size=p, pooling_kernel_size=k, max_soft_tokens=max_soft_tokens)

    special = [config.boi_token_id, config.eoi_token_id, config.image_token_id, config.video_token_id,
               config.boa_token_id, config.audio_token_id, text.vocab_size]
    lo, hi = max(text.pad_token_id, text.bos_token_id, text.eos_token_id) + 1, min(t for t in special if t is not None)
    soft = iter(processed["num_soft_tokens_per_image"])
    audio = None
    if audio_ms is not None:
        audio = process_audio([ms for clips in audio_ms for ms in clips], seed)
        audio_soft = iter(audio_tokens(audio["input_features_mask"]).sum(dim=1).tolist())
    rows = []
    for b, (sizes, runs) in enumerate(zip(image_sizes, text_runs)):
        assert len(runs) == len(sizes) + 1, "one text run before, between and after the images"
        ids = [text.bos_token_id]
        for j, run in enumerate(runs):
            ids += torch.randint(lo, hi, (run,), generator=gen).tolist()
            if j < len(sizes):
                ids += [config.boi_token_id] + [config.image_token_id] * next(soft) + [config.eoi_token_id]
            if j == len(sizes) - 1 and audio_ms is not None:  # the clips after the last image
                for _ in audio_ms[b]:
                    ids += [config.boa_token_id] + [config.audio_token_id] * next(audio_soft) + [config.eoa_token_index]
        rows.append(ids)

    seq = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), seq), text.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)] = torch.tensor(r)
        attention_mask[b, : len(r)] = 1
    mm = (input_ids == config.image_token_id).long()
    if audio is not None:
        mm = mm + 3 * (input_ids == config.audio_token_id).long()
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=torch.arange(seq).expand(len(rows), seq).clone(),
        mm_token_type_ids=mm,
        pixel_values=processed["pixel_values"],
        image_position_ids=processed["image_position_ids"],
        **(audio or {}),
    )
