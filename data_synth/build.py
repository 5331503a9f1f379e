"""Build the server dataset: generate -> teacher-filter -> re-balance -> frequency-augment -> save.

Generation runs in chunks (``chunk_size`` images per class at most) checkpointed in
``<out>.partial-work/``; after each chunk the builder counts the images the teacher accepts and asks
only the classes still short of ``images_per_class`` for more (sized by their acceptance rate, up to
``max_oversample x images_per_class`` generated per class). Every decision depends only on the
config and the chunks so far, so a restarted build replays the same sequence and reuses the files.
The final directory is written atomically by ``ServerDataset.save``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from clipfed_strategy.freq_augment import FreqAugConfig, augment_dataset, parse_ops
from clipfed_strategy.server_dataset import ServerDataset, ServerDatasetError

from .errors import SynthError
from .filtering import BALANCE_MODES, balanced_counts, filter_report, keep_mask, teacher_verdict
from .generators import GENERATORS, GenContext, Request, make_generator
from .workdir import ChunkStore, work_dir_for

log = logging.getLogger(__name__)

BUILD_KEY_VERSION = 1


def resolve_device(device="auto", teacher=None) -> torch.device:
    """``"auto"``: the teacher's device if it has one, else CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        tdev = getattr(teacher, "device", None)
        if tdev is not None:
            return torch.device(tdev)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SynthError(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:0)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SynthError(f"--device {device} requested but CUDA is not available here")
    return dev


def _resolution(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    h, w = (int(v) for v in resolution)
    if h < 2 or w < 2:
        raise SynthError(f"--resolution must be at least 2 px, got {h}x{w}")
    return h, w


def _teacher_info(teacher) -> dict:
    if teacher is None:
        return {"identity": "none", "is_standin": False}
    return {"identity": str(teacher.identity), "is_standin": bool(getattr(teacher, "is_standin", False))}


def build_key(config: dict) -> str:
    """sha256 of the JSON config (sorted keys): what must match for a dataset or checkpoint to be reused."""
    blob = json.dumps({"v": BUILD_KEY_VERSION, **config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _generation_config(config: dict) -> dict:
    """``config`` without the frequency augmentation, JSON-normalised (what decides the clean images)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "faug"}, default=str))


def _clean_from_sibling(out_dir: Path, config: dict) -> tuple[ServerDataset, Path] | None:
    """A complete dataset at or next to ``out_dir`` whose build config equals ``config`` in everything
    but the frequency augmentation (``faug``), and its directory; or ``None``.

    Generation is the slow part of a build (minutes to hours); changing the augmentation families
    or their parameters must not repeat it: the caller re-augments this dataset's clean rows.
    """
    want = _generation_config(config)
    parent = out_dir.parent
    if not parent.is_dir():
        return None
    candidates = [out_dir / "manifest.json"] + [m for m in sorted(parent.glob("*/manifest.json"))
                                                 if m.parent.resolve() != out_dir.resolve()]
    for manifest in candidates:
        if not manifest.is_file():
            continue
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        other = meta.get("build_config")
        if not meta.get("complete") or not isinstance(other, dict) or _generation_config(other) != want:
            continue
        try:
            return ServerDataset.load(manifest.parent), manifest.parent
        except ServerDatasetError as e:
            log.warning("cannot reuse the clean images of %s (%s)", manifest.parent, e)
    return None


def _existing(out_dir: Path, key: str) -> ServerDataset | None:
    manifest = out_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("complete") and meta.get("build_key") == key:
        try:
            ds = ServerDataset.load(out_dir)
        except ServerDatasetError as e:
            log.warning("server dataset at %s cannot be reused (%s); rebuilding", out_dir, e)
            return None
        log.info("reusing server dataset at %s (same config and teacher, hash %s)", out_dir, ds.content_hash()[:12])
        return ds
    log.warning("server dataset at %s was built with another config or teacher; rebuilding it", out_dir)
    return None


def _next_requests(chunk, target, chunk_size, caps, generated, kept) -> list[Request]:
    reqs = []
    for c, cap in enumerate(caps):
        if kept[c] >= target or generated[c] >= cap:
            continue
        if chunk == 0:
            count = min(chunk_size, target)
        else:
            rate = kept[c] / generated[c] if generated[c] else 1.0
            count = math.ceil((target - kept[c]) / max(rate, 0.05) * 1.2)
        count = max(1, min(count, chunk_size, cap - generated[c]))
        reqs.append(Request(c, generated[c], count))
    return reqs


def build_server_dataset(
    out_dir,
    teacher,
    class_names,
    resolution,
    channels: int,
    generator="teacher-inversion",
    images_per_class: int = 100,
    faug_ops="hf-noise,hf-patch,lf-blend",
    faug_copies: int = 1,
    min_conf: float = 0.5,
    seed: int = 0,
    device="auto",
    *,
    generator_options: dict | None = None,
    faug_params: FreqAugConfig | None = None,
    filter: bool = True,
    balance: str = "min",
    max_oversample: float = 3.0,
    chunk_size: int = 100,
    progress: bool = True,
    force: bool = False,
) -> ServerDataset:
    """Build (or reuse) CLIP-Fed's server dataset in ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Target directory (written atomically; checkpoints go to ``<out_dir>.partial-work/``).
    teacher : Teacher or None
        The (stand-in) CLIP teacher; None only with ``filter=False`` and a generator that needs none.
    class_names : list of str
        In label order.
    resolution : int or (int, int)
        FL image size.
    channels : int
        1 or 3.
    generator : str or Generator
        ``teacher-inversion`` (default), ``folder``, ``mllm``, or a ready generator object.
    images_per_class : int
        Clean images per class wanted after filtering. Default 100.
    faug_ops : str or list of str
        Frequency augmentation families (``clipfed_strategy.freq_augment.OPS``); ``""`` = none.
        Default ``"hf-noise,hf-patch,lf-blend"``.
    faug_copies : int
        Variants per clean image and family. Default 1.
    min_conf : float
        Teacher softmax probability of the intended class needed to keep an image. Default 0.5.
    seed : int
        Seeds generation and augmentation. Default 0.
    device : str
        ``auto`` (default: the teacher's device, else CUDA if available, else CPU), ``cpu``, ``cuda``.
    generator_options : dict, optional
        Generator settings (``InversionConfig`` fields, ``{"root": DIR}``, ``MLLMConfig`` fields).
    faug_params : FreqAugConfig, optional
        Family parameters; default ``FreqAugConfig()``.
    filter : bool
        Apply the teacher filter. Default True.
    balance : str
        ``min`` (default: equal counts per class) or ``none``.
    max_oversample : float
        At most ``ceil(max_oversample * images_per_class)`` images generated per class. Default 3.
    chunk_size : int
        Images per class per checkpointed chunk. Default 100.
    progress : bool
        tqdm progress bars. Default True.
    force : bool
        Rebuild even if ``out_dir`` holds a dataset with the same build key. Default False.

    Returns
    -------
    ServerDataset
        Also saved in ``out_dir``; its manifest records generator, config, teacher identity,
        ``is_standin``, filter statistics and the build key.

    Raises
    ------
    SynthError, FreqAugError, ServerDatasetError
        Bad settings or inputs; nothing that looks complete is left behind.
    """
    t0 = time.time()
    out_dir = Path(out_dir).resolve()
    class_names = [str(c) for c in class_names]
    if len(class_names) < 2:
        raise SynthError(f"a server dataset needs at least two classes, got {class_names}")
    res = _resolution(resolution)
    if channels not in (1, 3):
        raise SynthError(f"--channels must be 1 or 3, got {channels}")
    ops = parse_ops(faug_ops)
    faug_params = faug_params or FreqAugConfig()
    if images_per_class < 1 or faug_copies < 0 or chunk_size < 1 or max_oversample < 1:
        raise SynthError(
            "need images_per_class >= 1, faug_copies >= 0, chunk_size >= 1, max_oversample >= 1; got "
            f"{images_per_class}, {faug_copies}, {chunk_size}, {max_oversample}"
        )
    if balance not in BALANCE_MODES:
        raise SynthError(f"--balance {balance!r} not allowed; choose from {list(BALANCE_MODES)}")
    if filter and not 0.0 <= min_conf <= 1.0:
        raise SynthError(f"--min-conf must lie in [0, 1], got {min_conf}")
    if teacher is None and filter:
        raise SynthError("the teacher filter needs a teacher; pass one or use --no-filter")
    if isinstance(generator, str) and generator not in GENERATORS:
        raise SynthError(f"unknown generator {generator!r}; choose from {', '.join(GENERATORS)}")
    if teacher is not None and list(getattr(teacher, "class_names", class_names)) != class_names:
        raise SynthError(f"teacher class names {teacher.class_names} differ from the dataset's {class_names}")

    tinfo = _teacher_info(teacher)
    gen_spec = (
        {"name": generator, "options": generator_options or {}}
        if isinstance(generator, str)
        else generator.describe()
    )
    if generator == "teacher-inversion" and (generator_options or {}).get("w_bn") is None:
        from data_synth.generators.inversion import LEGACY_W_BN, default_w_bn

        # a channel-dependent default belongs to the build's identity; where it equals the former
        # fixed default the key stays as before, so existing grey-image sets are still reused
        if default_w_bn(channels) != LEGACY_W_BN:
            gen_spec["w_bn"] = default_w_bn(channels)
    config = {
        "class_names": class_names,
        "resolution": list(res),
        "channels": channels,
        "generator": gen_spec,
        "images_per_class": images_per_class,
        "faug": {"ops": ops, "copies": faug_copies, "params": faug_params.as_dict()},
        "filter": {"enabled": bool(filter), "min_conf": float(min_conf)},
        "balance": balance,
        "max_oversample": float(max_oversample),
        "chunk_size": chunk_size,
        "seed": seed,
        "teacher": tinfo["identity"],
    }
    key = build_key(config)
    if not force:
        ds = _existing(out_dir, key)
        if ds is not None:
            return ds
        reused = _clean_from_sibling(out_dir, config)
        if reused is not None:  # same generation, teacher and filter: only the augmentation differs
            previous, source = reused
            keep = previous.variants == 0
            n = int(keep.sum())
            meta = {k: v for k, v in previous.meta.items()
                    if k not in ("build", "faug", "content_hash", "num_images", "resolution", "channels", "subset")}
            meta.update(build_key=key, build_config=config,
                        clean_images_from={"path": str(source), "build_key": previous.meta.get("build_key")})
            clean = ServerDataset(previous.images[keep], previous.labels[keep], np.zeros(n, np.int64),
                                  np.arange(n, dtype=np.int64), list(previous.class_names), ["clean"], meta)
            ds = augment_dataset(clean, ops, faug_copies, faug_params, seed)
            ds.meta["build"] = {"seconds": round(time.time() - t0, 1), "chunks": 0, "device": "cpu",
                                "reused_clean_images": True}
            ds.save(out_dir)
            log.info("saved server dataset %s: the %d clean images of %s re-augmented with %s (no generation), hash %s",
                     out_dir, len(clean), source, ",".join(ops) or "no ops", ds.content_hash()[:12])
            return ds

    dev = resolve_device(device, teacher)
    ctx = GenContext(class_names, res, channels, dev, teacher, progress)
    gen = make_generator(generator, ctx, generator_options) if isinstance(generator, str) else generator
    log.info(
        "building server dataset %s: generator %s, %d classes x %d images at %dx%dx%d, teacher %s%s, device %s",
        out_dir, gen.name, len(class_names), images_per_class, res[0], res[1], channels, tinfo["identity"],
        " (STAND-IN)" if tinfo["is_standin"] else "", dev,
    )

    store = ChunkStore(work_dir_for(out_dir), key)
    ncls = len(class_names)
    cap_gen = math.ceil(max_oversample * images_per_class) if filter else images_per_class
    caps = [min(cap_gen, gen.capacity(c)) if gen.capacity(c) is not None else cap_gen for c in range(ncls)]
    generated, kept, top1 = [0] * ncls, [0] * ncls, [0] * ncls
    pieces: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(ncls)]  # (images, keep) per chunk
    chunk = 0
    while True:
        reqs = _next_requests(chunk, images_per_class, chunk_size, caps, generated, kept)
        if not reqs:
            break
        stored = {r.class_id: store.load(chunk, r.class_id, r.start, r.count) for r in reqs}
        missing = [r for r in reqs if stored[r.class_id] is None]
        if missing:
            todo = reqs if gen.joint else missing
            log.info("chunk %d: generating %d images for %d classes", chunk, sum(r.count for r in todo), len(todo))
            fresh = gen.generate(todo, chunk, seed)
            for r in todo:
                imgs = np.asarray(fresh[r.class_id], dtype=np.uint8)
                if imgs.shape != (r.count, *res, channels):
                    raise SynthError(
                        f"generator {gen.name} returned {imgs.shape} for class {class_names[r.class_id]!r}, "
                        f"expected {(r.count, *res, channels)}"
                    )
                labels = np.full(r.count, r.class_id, np.int64)
                if teacher is not None:
                    pred, conf = teacher_verdict(teacher, imgs, labels, dev)
                else:
                    pred, conf = labels.copy(), np.ones(r.count, np.float32)
                store.save(chunk, r.class_id, r.start, r.count, imgs, pred, conf)
                stored[r.class_id] = {"images": imgs, "pred": pred, "conf": conf}
        else:
            log.info("chunk %d: reusing %d checkpointed class chunks", chunk, len(reqs))
        for r in reqs:
            d = stored[r.class_id]
            labels = np.full(r.count, r.class_id, np.int64)
            keep = keep_mask(d["pred"], d["conf"], labels, min_conf) if filter else np.ones(r.count, bool)
            pieces[r.class_id].append((d["images"], keep))
            generated[r.class_id] += r.count
            kept[r.class_id] += int(keep.sum())
            top1[r.class_id] += int((d["pred"] == labels).sum())
        chunk += 1

    report = filter_report(class_names, generated, kept, top1)
    if filter:
        for name, row in report["per_class"].items():
            log.info(
                "filter %s: kept %d/%d (%.0f%%), teacher top-1 %.0f%%",
                name, row["kept"], row["generated"], 100 * row["kept_share"], 100 * row["teacher_top1"],
            )
    empty = [class_names[c] for c in range(ncls) if kept[c] == 0]
    if empty:
        store_note = f"checkpoints kept in {store.root}"
        raise SynthError(
            f"the teacher kept no image of class(es) {empty} at --min-conf {min_conf}; lower --min-conf, "
            f"raise --max-oversample or change the generator ({store_note})"
        )
    final = balanced_counts(kept, images_per_class, balance)
    short = [class_names[c] for c in range(ncls) if kept[c] < images_per_class]
    if short:
        log.warning("classes %s have fewer than %d kept images; final counts per class %s", short, images_per_class, final)
    else:
        log.info("balance %s: %d clean images per class", balance, final[0] if balance == "min" else max(final))

    images, labels = [], []
    for c in range(ncls):
        cls_imgs = np.concatenate([imgs[keep] for imgs, keep in pieces[c]])[: final[c]]
        images.append(cls_imgs)
        labels.append(np.full(len(cls_imgs), c, np.int64))
    images_arr, labels_arr = np.concatenate(images), np.concatenate(labels)
    n = len(images_arr)
    gen_desc = gen.describe()
    meta = {
        "generator": {"name": gen.name, "provenance": gen_desc.get("provenance", ""), "config": gen_desc.get("config", {})},
        "teacher": tinfo,
        "seed": seed,
        "filter": {"enabled": bool(filter), "min_conf": float(min_conf), **report},
        "balance": {"mode": balance, "target": images_per_class, "final_per_class": dict(zip(class_names, final))},
        "build_key": key,
        "build_config": config,
    }
    clean = ServerDataset(
        images_arr, labels_arr, np.zeros(n, np.int64), np.arange(n, dtype=np.int64), class_names, ["clean"], meta
    )
    ds = augment_dataset(clean, ops, faug_copies, faug_params, seed)
    ds.meta["build"] = {"seconds": round(time.time() - t0, 1), "chunks": chunk, "device": str(dev)}
    ds.save(out_dir)
    store.remove()
    log.info(
        "saved server dataset %s: %d images (%d clean), hash %s, %.1f s",
        out_dir, len(ds), n, ds.content_hash()[:12], time.time() - t0,
    )
    return ds
