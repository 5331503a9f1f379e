"""The ``mllm`` path end to end on a tiny random Janus saved locally (images are noise: expected)."""

import json

import numpy as np
import pytest
import torch

from data_synth import SynthError, build_server_dataset
from data_synth.generators import GenContext, make_generator
from data_synth.generators.prompts import PROMPT_TEMPLATES, class_prompts, default_templates

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "JanusForConditionalGeneration"):  # pragma: no cover
    pytest.skip("installed transformers has no Janus", allow_module_level=True)

CLASSES = ["cat", "dog"]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for c in CLASSES:
        for p in class_prompts(c):
            words.update(p.replace(".", " .").replace(",", " ,").split())
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"},
    )


@pytest.fixture(scope="module")
def tiny_janus(tmp_path_factory):
    """A randomly initialised Janus (1-layer Llama, 4x4 image tokens, 8x8 output) + processor on disk."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor, LlamaConfig

    tok = _tiny_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                  projection_dim=32, depth=1, num_image_tokens=16, mlp_ratio=2.0)
    vq = dict(embed_dim=4, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
              num_res_blocks=1, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=1)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, pad_token_id=0, eos_token_id=3)
    processor = JanusProcessor(image_processor=JanusImageProcessor(size={"height": 16, "width": 16}), tokenizer=tok, num_image_tokens=16)
    path = tmp_path_factory.mktemp("tiny-janus")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_prompts_vary_across_axes():
    t = default_templates()
    assert len(t) == 16 and len(set(t)) == 16
    assert t[:4] == [g[0] for g in PROMPT_TEMPLATES.values()]  # one of each axis first
    assert set(PROMPT_TEMPLATES) == {"object", "context", "viewpoint", "style"}
    with pytest.raises(SynthError, match="must contain"):
        class_prompts("cat", ["a photo"])


def test_tiny_janus_generates_a_dataset(tmp_path, tiny_janus):
    ds = build_server_dataset(
        tmp_path / "sds", None, CLASSES, 8, 3, generator="mllm",
        generator_options={"model": str(tiny_janus), "batch_size": 3}, images_per_class=4,
        faug_ops="hf-noise", filter=False, seed=1, device="cpu", progress=False,
    )
    assert ds.images.shape == (16, 8, 8, 3) and ds.images.dtype == np.uint8
    assert ds.counts() == {"cat": {"clean": 4, "hf-noise": 4}, "dog": {"clean": 4, "hf-noise": 4}}
    assert ds.images.std() > 0  # decoded noise, not a blank canvas
    manifest = json.loads((tmp_path / "sds" / "manifest.json").read_text())
    assert manifest["generator"]["name"] == "mllm" and manifest["generator"]["config"]["prompts_per_class"] == 16
    # grey output and seeded sampling
    gen = make_generator("mllm", GenContext(CLASSES, (6, 6), 1), {"model": str(tiny_janus), "batch_size": 2})
    from data_synth.generators import Request

    a = gen.generate([Request(1, 0, 2)], 0, seed=7)[1]
    b = gen.generate([Request(1, 0, 2)], 0, seed=7)[1]
    assert a.shape == (2, 6, 6, 1) and np.array_equal(a, b)


def test_missing_model_path_is_clear(tmp_path):
    ctx = GenContext(CLASSES, (8, 8), 3)
    with pytest.raises(SynthError, match="does not exist"):
        make_generator("mllm", ctx, {"model": str(tmp_path / "no-such-janus")})
    with pytest.raises(SynthError, match="needs --mllm-model"):
        make_generator("mllm", ctx, {})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SynthError, match="could not load Janus"):
        make_generator("mllm", ctx, {"model": str(empty)})
    out = tmp_path / "sds"
    with pytest.raises(SynthError):
        build_server_dataset(out, None, CLASSES, 8, 3, generator="mllm", generator_options={"model": str(empty)},
                             filter=False, progress=False)
    assert not out.exists()
