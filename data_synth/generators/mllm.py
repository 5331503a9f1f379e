"""``mllm``: a multimodal LLM that generates images (Janus / Janus-Pro through transformers).

Janus-Pro (DeepSeek, https://arxiv.org/abs/2501.17811) autoregressively predicts VQ image tokens that
its VQ decoder turns into pixels. transformers exposes it as ``JanusForConditionalGeneration`` +
``JanusProcessor``; image generation is ``processor(text, generation_mode="image")`` then
``model.generate(..., generation_mode="image")`` and ``model.decode_image_tokens``. Each class gets
varied prompts (object, context, viewpoint, style; see ``prompts.py``); image ``i`` of a class uses
prompt ``i mod P``. Outputs are resized to the FL resolution (antialiased) and converted to grey if
needed. CPU works but is slow for real checkpoints; CUDA (bf16) is used when the device is CUDA.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SynthError
from .base import GenContext, Request, derive_seed
from .prompts import class_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MLLMConfig:
    """Settings of the ``mllm`` generator.

    Parameters
    ----------
    model : str
        A local directory written by ``save_pretrained`` (model + processor) or a hub id such as
        ``deepseek-community/Janus-Pro-1B`` (needs it in the local HF cache when offline).
    templates : list of str
        Prompt templates with ``{c}``; empty = the built-in varied set.
    batch_size : int
        Prompts per ``generate`` call. Default 4.
    guidance_scale : float
        Classifier-free guidance scale. Default 5.0.
    temperature : float
        Sampling temperature. Default 1.0.
    use_chat_template : bool
        Wrap prompts in the processor's chat template when it has one. Default True.
    """

    model: str = ""
    templates: list = field(default_factory=list)
    batch_size: int = 4
    guidance_scale: float = 5.0
    temperature: float = 1.0
    use_chat_template: bool = True


def _is_path_like(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or Path(s).expanduser().exists()


def load_janus(model: str, device: torch.device):
    """``(model, processor)`` from a local directory or hub id; SynthError with the reason if not."""
    try:
        from transformers import JanusForConditionalGeneration, JanusProcessor
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        import transformers

        raise SynthError(
            f"generator 'mllm' needs transformers with Janus support (JanusForConditionalGeneration); "
            f"installed transformers {transformers.__version__} lacks it: {e}"
        ) from e
    if not model:
        raise SynthError("generator 'mllm' needs --mllm-model (a local Janus directory or a hub id)")
    local = _is_path_like(model)
    src = str(Path(model).expanduser().resolve()) if local else model
    if local and not Path(src).is_dir():
        raise SynthError(f"--mllm-model {src} does not exist (expected a directory written by save_pretrained)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        net = JanusForConditionalGeneration.from_pretrained(src, dtype=dtype, local_files_only=local)
        processor = JanusProcessor.from_pretrained(src, local_files_only=local)
    except Exception as e:
        raise SynthError(
            f"could not load Janus model/processor from {src!r}: {e}. Without internet, pass a local "
            "directory holding the model and its processor (save_pretrained)."
        ) from e
    return net.to(device).eval(), processor


class JanusGenerator:
    """Text-to-image through a Janus checkpoint (see module docstring)."""

    name = "mllm"
    joint = False

    def __init__(self, ctx: GenContext, config: MLLMConfig):
        self.ctx = ctx
        self.config = config
        if config.batch_size < 1:
            raise SynthError(f"mllm batch_size must be >= 1, got {config.batch_size}")
        self.model, self.processor = load_janus(config.model, ctx.device)
        self.prompts = [class_prompts(c, config.templates) for c in ctx.class_names]
        self.generation_config = self._generation_config()
        log.info(
            "mllm: Janus from %s on %s, %d prompts per class, guidance %.1f",
            config.model,
            ctx.device,
            len(self.prompts[0]),
            config.guidance_scale,
        )

    def _generation_config(self):
        tok = self.processor.tokenizer
        gc = copy.deepcopy(self.model.generation_config)
        extra = dict(getattr(gc, "generation_kwargs", None) or {})
        extra.setdefault("boi_token_id", tok.convert_tokens_to_ids(self.processor.image_start_token))
        gc.generation_kwargs = extra
        if gc.pad_token_id is None:
            gc.pad_token_id = tok.pad_token_id
        if gc.bos_token_id is None:
            gc.bos_token_id = tok.bos_token_id
        gc.do_sample = True
        gc.num_beams = 1
        gc.temperature = self.config.temperature
        gc.guidance_scale = self.config.guidance_scale
        gc.num_return_sequences = 1
        return gc

    def capacity(self, class_id: int) -> int | None:
        return None

    def describe(self) -> dict:
        cfg = asdict(self.config)
        cfg["prompts_per_class"] = len(self.prompts[0]) if self.prompts else 0
        return {"name": self.name, "provenance": f"Janus text-to-image ({self.config.model})", "config": cfg}

    def _wrap(self, prompt: str) -> str:
        if self.config.use_chat_template and getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            try:
                return self.processor.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as e:  # a template that cannot render plain text: use the prompt as is
                log.debug("chat template failed (%s); using the raw prompt", e)
        return prompt

    def _to_fl(self, pixels_uint8_nchw: torch.Tensor) -> np.ndarray:
        x = pixels_uint8_nchw.float().div(255.0)
        h, w = self.ctx.resolution
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        if self.ctx.channels == 1:
            wts = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * wts).sum(1, keepdim=True)
        return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def _generate_batch(self, prompts: list[str], seed: int) -> np.ndarray:
        dev = self.ctx.device
        inputs = self.processor(
            text=[self._wrap(p) for p in prompts], generation_mode="image", return_tensors="pt", padding=True
        )
        inputs = {k: v.to(dev) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        fork_devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            tokens = self.model.generate(
                **inputs, generation_config=copy.deepcopy(self.generation_config), generation_mode="image"
            )
        decoded = self.model.decode_image_tokens(tokens)
        pixels = self.processor.postprocess(list(decoded.float().cpu()), return_tensors="pt")["pixel_values"]
        return self._to_fl(pixels)

    def generate(self, requests: Sequence[Request], chunk: int, seed: int) -> dict[int, np.ndarray]:
        out = {}
        bs = self.config.batch_size
        for r in requests:
            prompts = self.prompts[r.class_id]
            batch_out = []
            starts = range(r.start, r.start + r.count, bs)
            for s in tqdm(starts, desc=f"mllm {self.ctx.class_names[r.class_id]}", disable=not self.ctx.progress, leave=False):
                idx = range(s, min(s + bs, r.start + r.count))
                batch_out.append(self._generate_batch([prompts[i % len(prompts)] for i in idx], derive_seed(seed, "mllm", r.class_id, s)))
            h, w = self.ctx.resolution
            out[r.class_id] = np.concatenate(batch_out) if batch_out else np.zeros((0, h, w, self.ctx.channels), np.uint8)
        return out

