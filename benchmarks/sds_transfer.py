"""How much class knowledge does a server dataset carry? Knowledge distillation onto a fresh model.

Usage::

    python -m benchmarks.sds_transfer [key=value ...] [--steps 800] [--eval-size 5000] [--out transfer.json]

The ``key=value`` pairs are run-config keys (as for ``python -m server_app.inprocess``); they pick the
dataset, the teacher (``clip-teacher``, ``clip-*``) and the server dataset (``sds-path``, or the one the
ServerApp builds and caches, with ``sds-max-per-class``) exactly as a ``defense=clipfed`` run would.

A fresh model of the run's architecture (``model``) is trained *only* by KL towards the teacher's
temperature-T predictions, with horizontal flips, on

* the server dataset's clean rows, and on all its rows (clean + frequency-augmented variants);
* as the reference, as many real held-out training images (the clean split the stand-in teacher
  was trained on; disjoint from every client and from the test set) as the server set has clean
  rows, and the whole held-out split.

Its test accuracy says how much of the teacher's knowledge the rows can carry into a student: a
server set on which the student stays at chance (10 % on CIFAR-10) can only regularise the global
model during CLIP-Fed's distillation (trigger invariance, drift), never teach it a class it lacks.
The ratio to the equal-size real-image reference is printed side by side. The teacher's own
zero-shot test accuracy is the ceiling of both. No client image is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipfed_strategy.losses import kd_kl_loss
from clipfed_strategy.teacher import load_teacher
from clipfed_strategy.teacher_cache import teacher_outputs
from fltask.config import parse_run_config
from fltask.datasets import load_task_data
from fltask.models import build_model
from fltask.partition import make_split
from fltask.training import main_accuracy, to_tensor
from server_app.app import eval_subset
from server_app.clipfed_setup import server_dataset, teacher_spec
from server_app.inprocess import default_run_config, parse_overrides

log = logging.getLogger("benchmarks.sds_transfer")


def kd_student(make_model, x: torch.Tensor, targets: torch.Tensor, steps: int, T: float = 3.0, lr: float = 0.05,
               batch: int = 128, seed: int = 0) -> torch.nn.Module:
    """A fresh model trained ``steps`` SGD steps on T²·KL(softmax(targets/T) ‖ softmax(student/T)), random
    horizontal flips, nothing else (no labels)."""
    if len(x) == 0:
        raise ValueError("no rows to distil on")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    targets = targets.float()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=gen)
        xb = x[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        loss = kd_kl_loss(model(xb), targets[idx], T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def transfer(overrides: dict[str, Any], steps: int = 800, eval_size: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Test accuracy of KD students on the server set and on real held-out images (see module docstring)."""
    cfg = parse_run_config({**default_run_config(), **overrides, "defense": "clipfed"})
    data = load_task_data(cfg)
    split = make_split(cfg, data)
    teacher = load_teacher(teacher_spec(cfg, data, split), list(data.class_names))
    sds = server_dataset(cfg, data, teacher)
    out = teacher_outputs(teacher, sds, str(cfg.cache_path / "teacher-outputs"), sds.hash)
    x_sds, y_sds, variants, _ = sds.to_tensors("cpu")
    t_sds = torch.as_tensor(np.asarray(out.logits), dtype=torch.float32)
    clean = variants == 0
    x_test, y_test = eval_subset(data.x_test, data.y_test, eval_size)
    h, _, c = data.image_shape
    make_model = lambda: build_model(cfg.model, c, data.num_classes, h)  # noqa: E731

    result: dict[str, Any] = {
        "teacher": teacher.identity, "teacher_is_standin": bool(teacher.is_standin),
        "server_dataset": {"hash": sds.hash, "rows": len(sds), "clean_rows": int(clean.sum()),
                           "generator": sds.meta.get("generator")},
        "steps": steps, "eval_size": len(y_test), "seed": seed,
        "teacher_test_accuracy": float((teacher.predict(x_test).cpu() == y_test).float().mean()),
        "teacher_top1_on_clean_rows": float((t_sds[clean].argmax(1) == y_sds[clean]).float().mean()),
    }
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "server set, clean rows": (x_sds[clean], t_sds[clean]),
        "server set, all rows": (x_sds, t_sds),
    }
    if len(split.heldout):
        rng = np.random.default_rng(seed)
        x_held = to_tensor(data.x_train[split.heldout])
        same = torch.from_numpy(np.sort(rng.permutation(len(x_held))[: int(clean.sum())]))
        t_held = teacher.zero_shot_logits(x_held).float().cpu()  # batched by the teacher
        sets["real held-out, as many as clean rows"] = (x_held[same], t_held[same])
        sets["real held-out, all"] = (x_held, t_held)
    rows = {}
    for name, (x, t) in sets.items():
        t0 = time.perf_counter()
        student = kd_student(make_model, x, t, steps, seed=seed)
        rows[name] = {"images": len(x), "test_accuracy": main_accuracy(student, x_test, y_test),
                      "seconds": time.perf_counter() - t0}
        log.info("%s: %d images, KD student test accuracy %.3f", name, len(x), rows[name]["test_accuracy"])
    result["students"] = rows
    ref = rows.get("real held-out, as many as clean rows")
    if ref and ref["test_accuracy"] > 0:
        result["clean_rows_vs_real"] = rows["server set, clean rows"]["test_accuracy"] / ref["test_accuracy"]
    return result


def print_table(result: dict[str, Any]) -> None:
    who = "STAND-IN teacher (NOT CLIP)" if result["teacher_is_standin"] else "CLIP teacher"
    print(f"{who}: {result['teacher']}")
    print(f"teacher zero-shot test accuracy {100 * result['teacher_test_accuracy']:.1f} %; "
          f"teacher top-1 on the server set's clean rows {100 * result['teacher_top1_on_clean_rows']:.1f} %")
    print(f"{'distilled on':40s} {'images':>7s} {'student test acc':>17s}")
    for name, row in result["students"].items():
        print(f"{name:40s} {row['images']:7d} {100 * row['test_accuracy']:16.1f}%")
    if "clean_rows_vs_real" in result:
        print(f"server-set clean rows / equal-size real images: {result['clean_rows_vs_real']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sds_transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="run-config key=value pairs")
    parser.add_argument("--steps", type=int, default=800, help="SGD steps per student")
    parser.add_argument("--eval-size", type=int, default=5000, help="test images (fixed subset, as the runs' eval-size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the result as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_overrides(args.overrides, known=default_run_config())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = transfer(overrides, steps=args.steps, eval_size=args.eval_size, seed=args.seed)
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
