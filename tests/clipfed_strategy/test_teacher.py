"""Teacher loading (open_clip checkpoint path, transformers dir), zero-shot maths, errors, cache.

Every model here is a tiny random one saved to a tmp file: no weights are downloaded.
"""

from __future__ import annotations

import json
import string
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfed_strategy import teacher as teacher_mod
from clipfed_strategy.server_dataset import ServerDataset
from clipfed_strategy.teacher import (
    TeacherLoadError,
    TeacherSpec,
    load_teacher,
    normalize_pixels,
    resize_to_model,
)
from clipfed_strategy.teacher_cache import teacher_outputs

torch.set_num_threads(1)
CLASSES = ["cat", "dog", "ship"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}."]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny random open_clip model: (name, config path, checkpoint path, in-memory model)."""
    import open_clip

    d = tmp_path_factory.mktemp("oc")
    name = f"clipfed-test-tiny-{uuid.uuid4().hex[:8]}"
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = d / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(name)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))
    ckpt = d / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return name, cfg_path, ckpt, model.eval()


@pytest.fixture(scope="module")
def oc_teacher(tiny_open_clip):
    name, cfg_path, ckpt, _ = tiny_open_clip
    spec = TeacherSpec(model=name, pretrained=str(ckpt), model_config=str(cfg_path), templates=TEMPLATES)
    return load_teacher(spec, CLASSES, device="cpu")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random transformers CLIPModel + char-level CLIPTokenizer + image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("hf")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,'":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]
    ).save_pretrained(d)
    return d


def _images(n=6, c=3, h=32, w=32, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ open_clip path
def test_open_clip_checkpoint_roundtrip_gives_identical_outputs(tiny_open_clip, oc_teacher):
    import open_clip

    name, _, ckpt, model = tiny_open_clip
    x = _images()
    with torch.no_grad():
        pix = normalize_pixels(resize_to_model(x, (32, 32)), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        ref_img = F.normalize(model.encode_image(pix), dim=-1)
        tok = open_clip.get_tokenizer(name)
        caps = [t.replace("{c}", c) for c in CLASSES for t in TEMPLATES]
        ref_txt = F.normalize(model.encode_text(tok(caps)), dim=-1).view(3, 2, -1)
        ref_proto = F.normalize(ref_txt.mean(1), dim=-1)
    assert torch.equal(oc_teacher.encode_images(x), ref_img)
    assert torch.equal(oc_teacher.text_prototypes, ref_proto)
    assert oc_teacher.logit_scale == pytest.approx(20.0, rel=1e-5)
    assert torch.allclose(oc_teacher.zero_shot_logits(x), 20.0 * ref_img @ ref_proto.T, atol=1e-5)
    assert oc_teacher.identity.startswith(f"open_clip:{name}:{ckpt}@")
    assert len(oc_teacher.identity.rsplit("@", 1)[1]) == 8
    assert not oc_teacher.is_standin
    assert all(not p.requires_grad for p in oc_teacher.model.parameters())
    assert not oc_teacher.model.training


def test_zero_shot_head_is_unit_norm_mean_over_templates(oc_teacher):
    protos = oc_teacher.text_prototypes
    assert protos.shape == (len(CLASSES), oc_teacher.embed_dim) == (3, 16)
    assert torch.allclose(protos.norm(dim=1), torch.ones(3), atol=1e-6)
    single = [oc_teacher.encode_class_prompts(CLASSES, [t]) for t in TEMPLATES]
    assert torch.allclose(protos, F.normalize(single[0] + single[1], dim=-1), atol=1e-6)
    assert not torch.allclose(single[0], single[1])  # the templates really differ


def test_logits_are_scale_times_cosine_and_scale_override(tiny_open_clip, oc_teacher):
    name, cfg_path, ckpt, _ = tiny_open_clip
    x = _images(seed=1)
    emb = oc_teacher.encode_images(x)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(oc_teacher.zero_shot_logits(x), oc_teacher.logit_scale * emb @ oc_teacher.text_prototypes.T)
    fixed = load_teacher(TeacherSpec(model=name, pretrained=str(ckpt), templates=TEMPLATES, logit_scale=7.0), CLASSES, "cpu")
    assert fixed.logit_scale == 7.0
    assert torch.allclose(fixed.zero_shot_logits(x), 7.0 * emb @ oc_teacher.text_prototypes.T, atol=1e-5)


def test_grey_small_and_odd_inputs(oc_teacher):
    grey = _images(n=4, c=1, h=8, w=8, seed=2)
    e = oc_teacher.encode_images(grey)
    assert e.shape == (4, 16)
    assert torch.allclose(e, oc_teacher.encode_images(grey.repeat(1, 3, 1, 1)), atol=1e-6)
    wide = oc_teacher.encode_images(_images(n=2, h=20, w=50))
    assert wide.shape == (2, 16) and torch.isfinite(wide).all()
    r = resize_to_model(_images(n=2, c=1, h=8, w=8), (32, 32))
    assert r.shape == (2, 3, 32, 32) and r.min() >= 0 and r.max() <= 1
    with pytest.raises(ValueError, match="NCHW"):
        oc_teacher.encode_images(torch.rand(2, 4, 8, 8))


def test_batch_size_does_not_change_outputs(oc_teacher):
    x = _images(n=7, seed=3)
    assert torch.allclose(oc_teacher.encode_images(x, batch_size=2), oc_teacher.encode_images(x, batch_size=64), atol=1e-5)


# ------------------------------------------------------------------------------ transformers path
def test_hf_local_dir_loads_and_is_deterministic(tiny_hf_dir):
    from transformers import AutoTokenizer, CLIPModel

    spec = TeacherSpec.from_strings(model="", pretrained="", hf_model=str(tiny_hf_dir), templates=";".join(TEMPLATES))
    assert spec.backend == "hf"
    t1 = load_teacher(spec, CLASSES, device="cpu")
    t2 = load_teacher(spec, CLASSES, device="cpu")
    x = _images(n=5, c=1, h=8, w=8, seed=4)
    assert t1.identity == t2.identity and t1.identity.startswith("hf:")
    assert torch.equal(t1.zero_shot_logits(x), t2.zero_shot_logits(x))
    assert t1.image_size == (32, 32)
    assert t1.text_prototypes.shape == (3, 16)
    assert torch.allclose(t1.text_prototypes.norm(dim=1), torch.ones(3), atol=1e-6)

    model = CLIPModel.from_pretrained(tiny_hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    with torch.no_grad():  # the processor's own mean/std, read from its config
        pix = normalize_pixels(resize_to_model(x, (32, 32)), [0.5, 0.4, 0.3], [0.2, 0.3, 0.25])
        out = model.get_image_features(pixel_values=pix)
        ref = F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)
        enc = tok(["a photo of a dog."], padding=True, return_tensors="pt")
        out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        dog = F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)[0]
    assert torch.allclose(t1.encode_images(x), ref, atol=1e-5)
    assert torch.allclose(t1.encode_class_prompts(["dog"], ["a photo of a {c}."])[0], dog, atol=1e-5)
    assert t1.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-5)


# ------------------------------------------------------------------------------ errors
def test_missing_checkpoint_names_the_key(tmp_path):
    with pytest.raises(TeacherLoadError, match="clip-pretrained") as e:
        load_teacher(TeacherSpec(model="RN50", pretrained=str(tmp_path / "nope.pt")), CLASSES, "cpu")
    assert "clip-hf-model" in str(e.value)
    with pytest.raises(TeacherLoadError, match="clip-hf-model"):
        load_teacher(TeacherSpec(backend="hf", hf_model=str(tmp_path / "nope")), CLASSES, "cpu")


def test_unknown_tag_and_model_offline(monkeypatch):
    monkeypatch.setattr(teacher_mod, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(TeacherLoadError, match="clip-pretrained") as e:
        load_teacher(TeacherSpec(model="RN50", pretrained="no-such-tag"), CLASSES, "cpu")
    assert "clip-model" in str(e.value) and "local" in str(e.value)
    with pytest.raises(TeacherLoadError, match="clip-model"):
        load_teacher(TeacherSpec(model="No-Such-Net", pretrained="openai"), CLASSES, "cpu")


def test_download_failure_is_wrapped_and_runs_offline(monkeypatch):
    """A failed download becomes a TeacherLoadError; with the hub unreachable, the load runs in
    huggingface_hub offline mode (cache only, no minute of retries) and the flag is restored."""
    import open_clip
    from huggingface_hub import constants

    seen = {}

    def fake_create(*a, **k):
        seen["offline"] = constants.HF_HUB_OFFLINE
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(teacher_mod, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(TeacherLoadError, match="clip-pretrained") as e:
        load_teacher(TeacherSpec(model="ViT-B-32", pretrained="openai"), CLASSES, "cpu")
    assert "Failed to download" in str(e.value)
    assert seen["offline"] is True and constants.HF_HUB_OFFLINE == before


def test_bad_spec_values():
    with pytest.raises(TeacherLoadError, match="open_clip, hf"):
        load_teacher(TeacherSpec(backend="jax"), CLASSES, "cpu")
    with pytest.raises(TeacherLoadError, match="open_clip, hf"):
        TeacherSpec.from_strings(backend="tf")
    with pytest.raises(TeacherLoadError, match=r"\{c\}"):
        TeacherSpec.from_strings(templates="a photo")
    with pytest.raises(TeacherLoadError, match="clip-hf-model"):
        TeacherSpec.from_strings(backend="hf")


def test_from_strings_parses_flat_values(tmp_path):
    s = TeacherSpec.from_strings(model="ViT-B-32", pretrained="openai", templates="a {c}; a photo of a {c}.", logit_scale="0")
    assert (s.backend, s.model, s.pretrained, s.templates, s.logit_scale) == (
        "open_clip", "ViT-B-32", "openai", ["a {c}", "a photo of a {c}."], 0.0
    )
    rel = TeacherSpec.from_strings(pretrained="./weights/model.pt")
    assert rel.pretrained.startswith("/") and rel.pretrained.endswith("weights/model.pt")


def test_model_config_stem_must_match(tiny_open_clip):
    name, cfg_path, ckpt, _ = tiny_open_clip
    with pytest.raises(TeacherLoadError, match="stem"):
        load_teacher(TeacherSpec(model="other-name", pretrained=str(ckpt), model_config=str(cfg_path)), CLASSES, "cpu")


# ------------------------------------------------------------------------------ cache
def test_teacher_outputs_cache_hit_does_not_rerun_model(oc_teacher, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 8, 8, 1), dtype=np.uint8)
    first = teacher_outputs(oc_teacher, images, tmp_path, dataset_hash="ds-1", batch_size=4)
    assert not first.from_cache and first.logits.shape == (10, 3) and first.embeddings.shape == (10, 16)
    assert first.logits.dtype == np.float32 and first.identity == oc_teacher.identity
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert np.allclose(first.logits, oc_teacher.zero_shot_logits(x).numpy(), atol=1e-5)
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 1

    calls = {"n": 0}
    real = oc_teacher.encode_images

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(oc_teacher, "encode_images", counting)
    again = teacher_outputs(oc_teacher, images, tmp_path, dataset_hash="ds-1")
    assert again.from_cache and calls["n"] == 0
    assert np.array_equal(again.logits, first.logits) and np.array_equal(again.embeddings, first.embeddings)

    other = teacher_outputs(oc_teacher, images, tmp_path, dataset_hash="ds-2")  # new key -> recompute
    assert not other.from_cache and calls["n"] > 0
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 2


def test_teacher_outputs_accepts_server_dataset(oc_teacher, tmp_path):
    rng = np.random.default_rng(1)
    ds = ServerDataset(
        images=rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8),
        labels=np.array([0, 1, 2, 0, 1]),
        variants=np.zeros(5, dtype=np.int64),
        source_index=np.arange(5),
        class_names=CLASSES,
    )
    out = teacher_outputs(oc_teacher, ds, tmp_path)
    assert out.logits.shape == (5, 3)
    assert teacher_outputs(oc_teacher, ds, tmp_path).from_cache
    logits, emb = out.to_tensors()
    assert logits.dtype == torch.float32 and emb.shape == (5, 16)
