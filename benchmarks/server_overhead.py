"""What CLIP-Fed costs the server: seconds per phase, peak memory and ratios, in one run.

Usage::

    python -m benchmarks.server_overhead           # CPU default: cnn K=10,50,100 on 400 rows; resnet18 K=10 on 80
    python -m benchmarks.server_overhead --quick   # tiny sizes, a smoke run
    python -m benchmarks.server_overhead --full    # GPU: cnn and resnet18 at K=10,50,100 on 4,000 rows
        [--ks 10,50,100] [--models cnn,resnet18] [--clean-per-class 10] [--variants 3]
        [--resnet-ks 10] [--resnet-clean-per-class 2] [--client-images 5000] [--resnet-epoch-images 256]
        [--client-batch 32] [--repeats 3] [--loop-max-k 50] [--vmap-max-k 50] [--device auto]
        [--threads N] [--chunk-size 16] [--out benchmarks/results/server_overhead.json]

What is measured, each cell in a fresh subprocess (so that its peak memory is its own)
    A synthetic federation of the requested size: random server images (``clean-per-class`` per
    class of 10 CIFAR classes + ``variants`` augmented copies of each, 32×32×3), random teacher
    logits / embeddings / prototypes (CLIPFedDefense takes plain arrays, so timing needs no real
    teacher), and K client replies = the global model plus Gaussian noise, packed as the Flower
    Messages a ClientApp sends. Then, with the default ``CLIPFedConfig`` (batched screening,
    collapse metric; distillation 1 epoch over all server rows, batch 128), repeats interleaved:

    ``round``      the real ``CLIPFed(FedAvg()).aggregate_train`` on those Messages, with its
                   own per-phase clock: validate / screen / aggregate / distil
    ``fedavg``     plain Flower ``FedAvg().aggregate_train`` on the same Messages
    ``batched``    ``CLIPFedDefense.screen`` as configured (``screen-batched = true``), called directly
    ``looped``     the same call with ``screen-batched = false`` (one model at a time)
    ``vmap``       (CPU only) batched screening forced to ``torch.vmap`` (``eval_method="vmap"``);
                   on CPU the default ``"auto"`` runs the models one after another, on GPU vmap
    ``floor``      K plain ``model(x)`` passes over the N server images, one client model after
                   another (batches of 512, ``no_grad``, eval, NCHW inputs as stored; loading the
                   weights not counted); ``floor_cl`` the same with channels-last inputs (CPU)
    ``epoch``      (one cell per model) one client's local epoch: ``fltask.training.train_local``
                   for 1 epoch (batch ``client-batch``, lr 0.05) on ``client-images`` random
                   images, or on fewer and scaled linearly (``--resnet-epoch-images``)

    Every time is the median of ``--repeats`` runs after an untimed warm-up. Peak memory:
    resident set size (Linux ``VmHWM``, reset before each phase; else the process-lifetime
    ``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Ratios: round ÷ FedAvg, round ÷ epoch, batched ÷ looped and vmap ÷ looped screening (direct calls
of the same method), the round's screening phase ÷ floor; plus the
largest server set (rows) for which round ≤ 1.5 × epoch would hold at the measured per-row costs.
The issue-7 targets (K=50, cnn, CPU) are checked and printed when that cell is in the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NUM_CLASSES = 10
IMAGE_SIZE = 32
CHANNELS = 3
MODELS = ("cnn", "resnet18", "resnet8")
TARGETS = {"screen_over_floor": 1.2, "batched_over_looped": 1.0, "round_over_epoch": 1.5}

log = logging.getLogger("server_overhead")


class BenchmarkConfigError(ValueError):
    """A benchmark setting outside its allowed values."""


@dataclass
class Cell:
    """One measurement in its own subprocess.

    ``kind="round"``: a CLIP-Fed server round of ``model`` at ``k`` clients with a server set of
    ``clean_per_class`` × (1 + ``variants``) × 10 rows. ``kind="epoch"``: one client's local epoch
    on ``epoch_images`` images (its time is scaled to ``client_images`` when fewer are trained).
    """

    model: str
    kind: str = "round"
    k: int = 10
    clean_per_class: int = 10
    variants: int = 3
    client_images: int = 5000
    epoch_images: int = 5000
    client_batch: int = 32
    repeats: int = 3
    device: str = "auto"
    threads: int = 0
    chunk_size: int = 0
    loop: bool = True
    vmap: bool = True
    seed: int = 0
    note: str = ""

    @property
    def rows(self) -> int:
        return NUM_CLASSES * self.clean_per_class * (1 + self.variants)


# --------------------------------------------------------------------------- measuring helpers


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    """Peak memory of one phase in MiB (``peak``) and its rise over the memory in use before it (``delta``)."""

    peak: float = 0.0
    delta: float = 0.0
    kind: str = ""


@contextmanager
def peak_memory(device) -> Iterator[Peak]:
    """Measure the peak memory of the ``with`` block (CUDA allocator on GPU, RSS on CPU)."""
    import torch

    out = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out.peak = torch.cuda.max_memory_allocated(device) / 2**20
        out.delta = out.peak - base / 2**20
        out.kind = "cuda max_memory_allocated"
        return
    resettable = _reset_rss_peak()
    base = _status_kb("VmRSS") or 0
    yield out
    hwm = _status_kb("VmHWM") if resettable else None
    if hwm is None:
        out.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.kind = "ru_maxrss (process lifetime)"
    else:
        out.peak = hwm / 1024
        out.kind = "VmHWM (RSS, reset per phase)"
    out.delta = out.peak - base / 1024


def timed(fn: Callable[[], Any], repeats: int, device) -> tuple[list[float], Peak, Any]:
    """Run ``fn`` ``repeats`` times; wall seconds of each, the largest peak, the last result."""
    import torch

    times, peak, result = [], Peak(), None
    for _ in range(repeats):
        with peak_memory(device) as p:
            t0 = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        if p.peak >= peak.peak:
            peak = p
    return times, peak, result


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------- synthetic federation


def synthetic_server_dataset(clean_per_class: int, variants: int, seed: int):
    """Random uint8 images: ``clean_per_class`` clean rows per class, each with ``variants`` augmented copies."""
    from clipfed_strategy.server_dataset import ServerDataset

    rng = np.random.default_rng(seed)
    n_clean = NUM_CLASSES * clean_per_class
    labels_clean = np.repeat(np.arange(NUM_CLASSES), clean_per_class)
    src = np.concatenate([np.arange(n_clean)] + [np.arange(n_clean)] * variants)
    var = np.concatenate([np.zeros(n_clean, dtype=np.int64)] + [np.full(n_clean, v + 1) for v in range(variants)])
    images = rng.integers(0, 256, size=(len(src), IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.uint8)
    names = ["clean"] + [f"aug{v + 1}" for v in range(variants)]
    return ServerDataset(images, labels_clean[src], var, src, [f"class{c}" for c in range(NUM_CLASSES)], names)


def client_states(global_state: dict[str, np.ndarray], k: int, seed: int, scale: float = 0.01) -> Iterator[dict[str, np.ndarray]]:
    """K client models: the global model plus Gaussian noise on every float tensor (generated lazily)."""
    rng = np.random.default_rng(seed + 1)
    for _ in range(k):
        yield {
            name: (v + scale * rng.standard_normal(v.shape, dtype=np.float32)).astype(v.dtype)
            if v.dtype.kind == "f" and "running_var" not in name else v.copy()
            for name, v in global_state.items()
        }


def reply(state: dict[str, np.ndarray], num_examples: int, node_id: int):
    """A ClientApp's train reply (arrays + metrics + ground truth) from node ``node_id``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import Metadata

    content = RecordDict({
        # np.ascontiguousarray would turn 0-d arrays (num_batches_tracked) into shape (1,)
        "arrays": ArrayRecord({k: Array(v if v.flags.c_contiguous else v.copy()) for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0}),
        "ground-truth": ConfigRecord({"malicious": False, "partition-id": node_id - 1}),
    })
    meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=node_id, dst_node_id=1,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    return Message(content=content, metadata=meta)


# --------------------------------------------------------------------------- one cell


def run_cell(cell: Cell) -> dict[str, Any]:
    """Measure one cell in this process; returns a JSON-friendly dict."""
    import torch

    if cell.threads > 0:
        torch.set_num_threads(cell.threads)
    torch.manual_seed(cell.seed)
    if cell.kind == "epoch":
        return _run_epoch(cell)
    if cell.kind != "round":
        raise BenchmarkConfigError(f"cell kind is {cell.kind!r}; allowed values: round, epoch")
    return _run_round(cell)


def _run_epoch(cell: Cell) -> dict[str, Any]:
    """One client's local epoch with ``fltask.training.train_local`` (lr 0.05, momentum 0.9)."""
    import torch

    from clipfed_strategy.core import resolve_device
    from fltask.models import build_model
    from fltask.training import train_local

    device = resolve_device(cell.device)
    model = build_model(cell.model, CHANNELS, NUM_CLASSES, IMAGE_SIZE)
    g = torch.Generator().manual_seed(cell.seed)
    xc = torch.rand(cell.epoch_images, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device)
    yc = torch.randint(0, NUM_CLASSES, (cell.epoch_images,), generator=g).to(device)

    def epoch(images: int) -> None:
        m = copy.deepcopy(model).to(device)
        train_local(m, xc[:images], yc[:images], epochs=1, lr=0.05, batch_size=cell.client_batch, seed=cell.seed)

    epoch(2 * cell.client_batch)  # warm-up
    load = os.getloadavg()[0]
    times, mem, _ = timed(lambda: epoch(cell.epoch_images), cell.repeats, device)
    measured = median(times)
    return {"cell": asdict(cell), "device": str(device), "threads": torch.get_num_threads(), "load_before": load,
            "seconds": {"client_epoch_measured": measured,
                        "client_epoch": measured * cell.client_images / cell.epoch_images},
            "samples": {"client_epoch": times}, "peak_mib": {"client_epoch": asdict(mem)},
            "extrapolated": cell.epoch_images != cell.client_images, "load_after": os.getloadavg()[0]}


def _run_round(cell: Cell) -> dict[str, Any]:
    import torch
    from flwr.serverapp.strategy import FedAvg

    from clipfed_strategy.config import CLIPFedConfig, ScreeningConfig
    from clipfed_strategy.core import CLIPFedDefense, ClientUpdate, resolve_device
    from clipfed_strategy.message_api import CLIPFed
    from fltask.models import build_model

    device = resolve_device(cell.device)
    R = max(1, cell.repeats)
    model = build_model(cell.model, CHANNELS, NUM_CLASSES, IMAGE_SIZE)
    global_state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    sd = synthetic_server_dataset(cell.clean_per_class, cell.variants, cell.seed)
    rng = np.random.default_rng(cell.seed)
    n = len(sd)
    t_logits = (3.0 * rng.standard_normal((n, NUM_CLASSES))).astype(np.float32)
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    protos = rng.standard_normal((NUM_CLASSES, 512)).astype(np.float32)
    screen_cfg = ScreeningConfig(chunk_size=cell.chunk_size) if cell.chunk_size > 0 else ScreeningConfig()
    config = CLIPFedConfig(screen=screen_cfg, device=str(device), seed=cell.seed)
    t0 = time.perf_counter()
    defense = CLIPFedDefense(model, sd, t_logits, emb, protos,
                             {"identity": "random arrays (benchmark)", "is_standin": True}, config)
    setup_s = time.perf_counter() - t0
    default_method = "vmap" if device.type != "cpu" else "sequential"  # what eval_method="auto" picks

    per_client = max(1, 50_000 // cell.k)
    replies = [reply(s, per_client, i + 1) for i, s in enumerate(client_states(global_state, cell.k, cell.seed))]
    updates = [ClientUpdate(str(i), {k: a.numpy() for k, a in m.content["arrays"].items()}, per_client)
               for i, m in enumerate(replies)]
    out: dict[str, Any] = {"cell": asdict(cell), "rows": n, "device": str(device),
                           "threads": torch.get_num_threads(), "setup_seconds": setup_s,
                           "screen_method": default_method,
                           "model_params": int(sum(v.size for v in global_state.values())),
                           "load_before": os.getloadavg()[0]}

    def screen_with(batched: bool, method: str = "auto", which: list = updates):
        defense.config.screen.batched, defense.eval_method = batched, method
        try:
            return defense.screen(1, global_state, which)
        finally:
            defense.config.screen.batched, defense.eval_method = True, "auto"

    # warm-up (first calls pay for kernel selection, lazy init, the distillation head): untimed
    warm = CLIPFed(FedAvg(), defense)
    warm.current = global_state
    warm.aggregate_train(1, replies[: min(3, cell.k)])
    do_loop = cell.loop
    do_vmap = cell.vmap and default_method != "vmap"  # on GPU the round itself is the vmap measurement
    if do_loop:
        screen_with(False, which=updates[:2])
    if do_vmap:
        screen_with(True, "vmap", which=updates[:2])

    strategy = CLIPFed(FedAvg(), defense)
    strategy.current = global_state  # what configure_train stores
    samples: dict[str, list[float]] = {}
    peaks: dict[str, Peak] = {}

    def record(name: str, fn: Callable[[], Any]) -> None:
        times, mem, _ = timed(fn, 1, device)
        samples.setdefault(name, []).extend(times)
        if mem.peak >= peaks.get(name, Peak()).peak:
            peaks[name] = mem

    # the floor: K plain forward passes, one client model after another, over the server set as
    # a user holds it (NCHW) and, on CPU, channels-last (the fastest plain layout there)
    plain = copy.deepcopy(model).to(device).eval()
    plain_states = [{k: torch.from_numpy(v) for k, v in u.state.items()} for u in updates]
    layouts = {"floor": defense.x.contiguous()}
    if device.type == "cpu":
        layouts["floor_cl"] = defense.x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def floor(x: torch.Tensor, states: list) -> float:
        """Seconds of the forward passes alone (loading each model's weights is not counted)."""
        total = 0.0
        for st in states:
            plain.load_state_dict(st)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            for b in range(0, x.shape[0], 512):
                plain(x[b : b + 512])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total += time.perf_counter() - t
        return total

    for x in layouts.values():
        floor(x, plain_states[:1])  # warm-up

    def run_round(r: int) -> None:
        record("round", lambda: strategy.aggregate_train(r + 1, replies))
        for name, sec in strategy.last_round_report["seconds"].items():
            samples.setdefault(f"round_{name}", []).append(sec)

    steps: list[Callable[[int], None]] = [lambda r: record("fedavg", lambda: FedAvg().aggregate_train(1, replies)),
                                          run_round]
    if do_loop:  # the same call both ways, so the ratio compares the evaluation paths and nothing else
        steps.append(lambda r: record("screen_batched", lambda: screen_with(True)))
        steps.append(lambda r: record("screen_looped", lambda: screen_with(False)))
    if do_vmap:
        steps.append(lambda r: record("screen_vmap", lambda: screen_with(True, "vmap")))
    for name, x in layouts.items():
        steps.append(lambda r, name=name, x=x: samples.setdefault(name, []).append(floor(x, plain_states)))
    # repeats interleaved, in reverse order every other repeat, so that a change of machine load
    # (or any drift) hits every variant alike
    for r in range(R):
        for step in (steps if r % 2 == 0 else steps[::-1]):
            step(r)
    report = strategy.last_round_report
    if report["rejected"]:
        log.warning("the round rejected %d of %d synthetic replies: %s", len(report["rejected"]), cell.k,
                    next(iter(report["reasons"].values())))
    out["round_accepted"] = len(report["accepted"])
    del replies

    sec = {name: median(v) for name, v in samples.items()}
    channels_last = "floor_cl" in sec
    out.update({
        "seconds": sec,
        "samples": samples,
        "peak_mib": {name: asdict(p) for name, p in peaks.items()},
        "ratios": _ratios(sec, do_loop, do_vmap, channels_last),
        # the same from the fastest repeat of each (noise on a shared machine only ever adds time)
        "ratios_best": _ratios({name: min(v) for name, v in samples.items()}, do_loop, do_vmap, channels_last),
        "load_after": os.getloadavg()[0],
    })
    return out


def _ratios(sec: dict[str, float], loop: bool, vmap: bool, channels_last: bool) -> dict[str, float | None]:
    screen_s = sec["round_screen"]
    return {
        "round_over_fedavg": sec["round"] / sec["fedavg"],
        "batched_over_looped": sec["screen_batched"] / sec["screen_looped"] if loop else None,
        "vmap_over_looped": sec["screen_vmap"] / sec["screen_looped"] if loop and vmap else None,
        "screen_over_floor": screen_s / sec["floor"],
        "screen_over_floor_cl": screen_s / sec["floor_cl"] if channels_last else None,
    }


def with_epoch(result: dict[str, Any], epoch: dict[str, Any] | None) -> dict[str, Any]:
    """Add round ÷ epoch and the break-even server-set size (round ≤ 1.5 × epoch) to a round cell."""
    if "error" in result or epoch is None or "error" in epoch:
        return result
    sec = result["seconds"]
    epoch_s = epoch["seconds"]["client_epoch"]
    sec["client_epoch"] = epoch_s
    result["ratios"]["round_over_epoch"] = sec["round"] / epoch_s
    result["ratios_best"]["round_over_epoch"] = min(result["samples"]["round"]) / min(epoch["samples"]["client_epoch"]) \
        * epoch["cell"]["epoch_images"] / epoch["cell"]["client_images"]
    per_row = (sec["round_screen"] + sec["round_distill"]) / result["rows"]
    fixed = sec["round"] - sec["round_screen"] - sec["round_distill"]
    result["break_even_rows"] = max(0, int((TARGETS["round_over_epoch"] * epoch_s - fixed) / per_row))
    result["client_epoch_images"] = {"target": epoch["cell"]["client_images"],
                                     "measured": epoch["cell"]["epoch_images"]}
    return result


# --------------------------------------------------------------------------- the run


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkConfigError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise BenchmarkConfigError(f"{flag} values must be >= 1, got {text!r}")
    return values


def plan(args: argparse.Namespace) -> list[Cell]:
    """The cells a command line asks for: per model one epoch cell, then one round cell per K."""
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise BenchmarkConfigError(f"--models has {m!r}; allowed values: {', '.join(MODELS)}")
    ks = _ints(args.ks, "--ks")
    resnet_ks = _ints(args.resnet_ks, "--resnet-ks") if args.resnet_ks else ks
    common = dict(variants=args.variants, client_images=args.client_images, client_batch=args.client_batch,
                  repeats=args.repeats, device=args.device, threads=args.threads, chunk_size=args.chunk_size,
                  seed=args.seed)
    cells = []
    for m in models:
        small = m != "cnn"
        cpc = args.resnet_clean_per_class if small and args.resnet_clean_per_class else args.clean_per_class
        epoch_images = min(args.resnet_epoch_images or args.client_images, args.client_images) if small \
            else args.client_images
        cells.append(Cell(model=m, kind="epoch", epoch_images=epoch_images, **common))
        for k in (resnet_ks if small else ks):
            note = "smaller server set" if cpc != args.clean_per_class else ""
            cells.append(Cell(model=m, k=k, clean_per_class=cpc, note=note, loop=k <= args.loop_max_k,
                              vmap=k <= args.vmap_max_k, **common))
    return cells


def run_in_subprocess(cell: Cell, timeout: float | None) -> dict[str, Any]:
    """Run one cell in a fresh interpreter (so its peak memory is its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cell.json"
        cmd = [sys.executable, "-m", "benchmarks.server_overhead", "--cell", json.dumps(asdict(cell)),
               "--cell-out", str(path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            return {"cell": asdict(cell), "error": f"exit {proc.returncode}: {tail}"}
        return json.loads(path.read_text())


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _pair(a: Any, b: Any) -> str:
    return _fmt(a) if b is None else f"{_fmt(a)} / {_fmt(b)}"


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the round cells (seconds are medians over repeats)."""
    head = ("| model | K | server rows | screen s (round) | batched s | looped s | vmap s | floor s (NCHW / cl) | validate s | "
            "aggregate s | distil s | round s | FedAvg s | client epoch s | peak MiB (round) | round/FedAvg | "
            "round/epoch | batched/looped | vmap/looped | screen/floor (NCHW / cl) | break-even rows |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c = r["cell"]
        if c.get("kind", "round") != "round":
            continue
        if "error" in r:
            lines.append(f"| {c['model']} | {c['k']} | - | error: {r['error'].strip().splitlines()[-1][:80]} |")
            continue
        s, q = r["seconds"], r["ratios"]
        rows = f"{r['rows']}" + (" (smaller)" if c.get("note") else "")
        if r.get("round_accepted", c["k"]) < c["k"]:
            rows += f" ({r['round_accepted']}/{c['k']} replies accepted!)"
        epoch = _fmt(s.get("client_epoch"))
        imgs = r.get("client_epoch_images")
        if imgs:
            epoch += f" ({imgs['target']} img" + (f", est. from {imgs['measured']})" if imgs["measured"] != imgs["target"]
                                                  else ")")
        lines.append("| " + " | ".join([
            c["model"], str(c["k"]), rows, _fmt(s["round_screen"]), _fmt(s.get("screen_batched")),
            _fmt(s.get("screen_looped")),
            _fmt(s.get("screen_vmap")), _pair(s["floor"], s.get("floor_cl")), _fmt(s["round_validate"], 3),
            _fmt(s["round_aggregate"], 3),
            _fmt(s["round_distill"]), _fmt(s["round"]), _fmt(s["fedavg"], 3), epoch,
            _fmt(r["peak_mib"]["round"]["peak"], 0), _fmt(q["round_over_fedavg"], 1), _fmt(q.get("round_over_epoch")),
            _fmt(q.get("batched_over_looped")), _fmt(q.get("vmap_over_looped")),
            _pair(q["screen_over_floor"], q.get("screen_over_floor_cl")),
            _fmt(r.get("break_even_rows")),
        ]) + " |")
    return "\n".join(lines)


def check_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 7's CPU targets, read from the cnn K=50 CPU cell (empty when that cell is not in the run)."""
    cell = next((r for r in results if "error" not in r and r["cell"].get("kind", "round") == "round"
                 and r["cell"]["model"] == "cnn" and r["cell"]["k"] == 50 and r["device"] == "cpu"), None)
    if cell is None:
        return {}
    out = {}
    for name, limit in TARGETS.items():
        value = cell["ratios"].get(name)
        out[name] = {"value": value, "limit": limit, "met": None if value is None else bool(value <= limit),
                     "value_best": cell.get("ratios_best", {}).get(name), "rows": cell.get("rows")}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: cnn at K=3,5 on 40 rows, 1 repeat (a smoke run)")
    p.add_argument("--full", action="store_true",
                   help="paper scale (meant for a GPU): cnn and resnet18 at K=10,50,100 on 4,000 rows, every variant")
    p.add_argument("--ks", default="10,50,100", help="numbers of clients K (CSV); default 10,50,100")
    p.add_argument("--models", default="cnn,resnet18", help=f"CSV of {', '.join(MODELS)}; default cnn,resnet18")
    p.add_argument("--clean-per-class", type=int, default=10,
                   help="clean server images per class (rows = 10 x this x (1 + variants)); default 10 "
                        "(400 rows; 100 = 4,000 rows is the realistic CIFAR size, --full)")
    p.add_argument("--variants", type=int, default=3, help="augmented copies of every clean image; default 3")
    p.add_argument("--resnet-ks", default="10", help="K values for non-cnn models (CSV, '' = --ks); default 10")
    p.add_argument("--resnet-clean-per-class", type=int, default=2,
                   help="clean images per class for non-cnn models (0 = --clean-per-class); default 2")
    p.add_argument("--client-images", type=int, default=5000,
                   help="images in the client epoch the ratios refer to (50,000 / 10 clients); default 5000")
    p.add_argument("--resnet-epoch-images", type=int, default=256,
                   help="images actually trained for a non-cnn epoch, scaled to --client-images "
                        "(0 = all); default 256")
    p.add_argument("--client-batch", type=int, default=32, help="client batch size (fltask default); default 32")
    p.add_argument("--repeats", type=int, default=3, help="repeats per timing, the median is reported; default 3")
    p.add_argument("--loop-max-k", type=int, default=50, help="time looped screening only up to this K; default 50")
    p.add_argument("--vmap-max-k", type=int, default=50,
                   help="time forced-vmap screening (CPU only) up to this K; default 50")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]; default auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--chunk-size", type=int, default=0, help="screen-chunk-size for vmap (0 = CLIPFedConfig default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell-timeout", type=float, default=None, help="seconds per cell (default: none)")
    p.add_argument("--out", default="benchmarks/results/server_overhead.json", help="JSON results file")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    p.add_argument("--cell-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.full:
        raise BenchmarkConfigError("--quick and --full exclude each other")
    if args.quick:
        args.ks, args.models, args.clean_per_class, args.variants = "3,5", "cnn", 2, 1
        args.resnet_ks, args.client_images, args.repeats = "", 64, 1
    if args.full:
        args.ks, args.models, args.resnet_ks, args.resnet_clean_per_class = "10,50,100", "cnn,resnet18", "", 0
        args.clean_per_class, args.resnet_epoch_images, args.loop_max_k, args.vmap_max_k = 100, 0, 100, 100
    for name in ("clean_per_class", "client_images", "client_batch", "repeats"):
        if getattr(args, name) < 1:
            raise BenchmarkConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.variants < 1:
        raise BenchmarkConfigError("--variants must be >= 1 (screening compares augmented with clean rows)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cell:
        result = run_cell(Cell(**json.loads(args.cell)))
        Path(args.cell_out).write_text(json.dumps(result))
        return 0
    cells = plan(args)
    started = time.time()
    results, epochs = [], {}
    for cell in cells:
        what = f"epoch on {cell.epoch_images} images" if cell.kind == "epoch" else f"K={cell.k} rows={cell.rows}"
        print(f"[server_overhead] {cell.model} {what} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
        result = run_in_subprocess(cell, args.cell_timeout)
        if cell.kind == "epoch":
            epochs[cell.model] = result
        else:
            result = with_epoch(result, epochs.get(cell.model))
        results.append(result)
    import torch

    summary = {
        "command": " ".join(["python -m benchmarks.server_overhead"] + (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "load_average_1min": {"min": min(r.get("load_before", 0) for r in results),
                              "max": max(r.get("load_after", 0) for r in results)},
        "epochs": {m: r for m, r in epochs.items()},
        "results": [r for r in results if r["cell"]["kind"] == "round"],
        "targets_cpu_cnn_k50": check_targets(results),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(table(results))
    for name, t in summary["targets_cpu_cnn_k50"].items():
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        print(f"target {name} <= {t['limit']} (cnn, K=50, {t['rows']} rows): {_fmt(t['value'])} -> {verdict} "
              f"(fastest repeats: {_fmt(t['value_best'])})")
    print(f"load average (1 min) {summary['load_average_1min']['min']:.1f}..{summary['load_average_1min']['max']:.1f}; "
          f"wrote {out} ({summary['wall_seconds']:.0f} s)")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
