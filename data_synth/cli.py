"""Command line: ``python -m data_synth build ...`` / ``inspect DIR`` (console script ``clipfed-synth``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from clipfed_strategy.freq_augment import OPS, FreqAugConfig

from .build import build_server_dataset, resolve_device
from .classes import CLASS_LISTS, resolve_class_names
from .errors import SynthError
from .filtering import BALANCE_MODES
from .generators import GENERATORS
from .generators.inversion import PARAMS

log = logging.getLogger("data_synth")


def _resolution(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolution must be N or HxW, got {text!r}") from None
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f"--resolution must be N or HxW, got {text!r}")


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build a server dataset", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--generator", default="teacher-inversion", choices=GENERATORS)
    p.add_argument("--dataset-classes", required=True, help=f"{'|'.join(CLASS_LISTS)} or 'a,b,c'")
    p.add_argument("--resolution", type=_resolution, default=(32, 32), help="N or HxW")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--images-per-class", type=int, default=100, help="clean images per class after filtering")
    p.add_argument("--faug-ops", default="hf-noise,hf-patch,lf-blend", help=f"CSV of {','.join(OPS)} ('' = none)")
    p.add_argument("--faug-copies", type=int, default=1)
    p.add_argument(
        "--faug-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a FreqAugConfig setting, e.g. eps-max=0.2, patch-max=4, rho-hi=0.6 (repeatable)",
    )
    p.add_argument("--min-conf", type=float, default=0.5, help="teacher prob of the intended class to keep an image")
    p.add_argument("--no-filter", action="store_true", help="keep every generated image")
    p.add_argument("--balance", default="min", choices=BALANCE_MODES)
    p.add_argument("--max-oversample", type=float, default=3.0, help="max generated / images-per-class")
    p.add_argument("--chunk-size", type=int, default=100, help="images per class per checkpointed chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda[:i]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT holds the same build")
    p.add_argument("--no-progress", action="store_true")
    t = p.add_argument_group("teacher (clipfed_strategy.teacher.TeacherSpec)")
    t.add_argument("--clip-backend", default="", help="open_clip|hf ('' = hf if --clip-hf-model else open_clip)")
    t.add_argument("--clip-model", default="ViT-B-32")
    t.add_argument("--clip-pretrained", default="openai", help="open_clip tag or local checkpoint file")
    t.add_argument("--clip-hf-model", default="", help="transformers CLIPModel hub id or local directory")
    t.add_argument("--clip-model-config", default="", help="open_clip JSON model config to register")
    t.add_argument("--clip-templates", default="a photo of a {c}.", help="';'-separated prompt templates")
    t.add_argument(
        "--standin",
        default="",
        metavar="DIR",
        help="use the offline STAND-IN teacher saved in DIR (clipfed_strategy.standin_teacher); overrides --clip-*",
    )
    g = p.add_argument_group("generator options")
    g.add_argument("--folder", default="", help="folder: root with one sub-folder per class name")
    g.add_argument("--mllm-model", default="", help="mllm: Janus local directory or hub id")
    g.add_argument("--mllm-templates", default="", help="mllm: ';'-separated prompt templates with {c}")
    g.add_argument("--mllm-batch-size", type=int, default=4)
    g.add_argument("--mllm-guidance", type=float, default=5.0)
    g.add_argument("--inv-steps", type=int, default=None)
    g.add_argument("--inv-lr", type=float, default=None)
    g.add_argument("--inv-param", default=None, choices=PARAMS)
    g.add_argument("--inv-batch-size", type=int, default=None)
    g.add_argument("--inv-w-tv", type=float, default=None)
    g.add_argument("--inv-w-l2", type=float, default=None)
    g.add_argument("--inv-w-div", type=float, default=None)
    g.add_argument("--inv-w-bn", type=float, default=None)
    g.add_argument("--inv-jitter", type=int, default=None)
    g.add_argument("--inv-flip", default=None, choices=("on", "off"))
    g.add_argument("--inv-crop-min", type=float, default=None,
                   help="random-resized-crop side fraction per step, U[crop_min, 1] (1 = off)")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print counts/provenance and write contact sheets")
    p.add_argument("dir", help="server dataset directory")
    p.add_argument("--sheet-dir", default=None, help="where to write one PNG per class (default DIR/sheets)")
    p.add_argument("--per-row", type=int, default=12, help="clean images per contact sheet")
    p.add_argument("--no-sheets", action="store_true")


def _key_values(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SynthError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def generator_options(args) -> dict:
    if args.generator == "folder":
        return {"root": args.folder}
    if args.generator == "mllm":
        templates = [t.strip() for t in args.mllm_templates.split(";") if t.strip()]
        return {"model": args.mllm_model, "templates": templates, "batch_size": args.mllm_batch_size, "guidance_scale": args.mllm_guidance}
    opts = {
        "steps": args.inv_steps,
        "lr": args.inv_lr,
        "param": args.inv_param,
        "batch_size": args.inv_batch_size,
        "w_tv": args.inv_w_tv,
        "w_l2": args.inv_w_l2,
        "w_div": args.inv_w_div,
        "w_bn": args.inv_w_bn,
        "jitter": args.inv_jitter,
        "flip": None if args.inv_flip is None else args.inv_flip == "on",
        "crop_min": args.inv_crop_min,
    }
    return {k: v for k, v in opts.items() if v is not None}


def load_cli_teacher(args, class_names, device):
    """A Teacher from the ``--clip-*`` flags, or None when neither filter nor generator needs one."""
    if args.no_filter and args.generator != "teacher-inversion":
        return None
    from clipfed_strategy.teacher import TeacherSpec, load_teacher

    if args.standin:
        from clipfed_strategy.standin_teacher import read_standin

        found = read_standin(args.standin)
        if found is None:
            raise SynthError(f"--standin {args.standin} holds no finished stand-in teacher (standin.json + standin.pt)")
        return load_teacher(found[0], class_names, device=device)
    spec = TeacherSpec.from_strings(
        model=args.clip_model,
        pretrained=args.clip_pretrained,
        hf_model=args.clip_hf_model,
        templates=args.clip_templates,
        backend=args.clip_backend,
        model_config=args.clip_model_config,
    )
    return load_teacher(spec, class_names, device=device)


def cmd_build(args) -> int:
    class_names = resolve_class_names(args.dataset_classes)
    from clipfed_strategy.freq_augment import parse_ops

    parse_ops(args.faug_ops)  # fail before loading any model
    faug_params = FreqAugConfig.from_mapping(_key_values(args.faug_param, "--faug-param"))
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    teacher = load_cli_teacher(args, class_names, device)
    ds = build_server_dataset(
        args.out,
        teacher,
        class_names,
        args.resolution,
        args.channels,
        generator=args.generator,
        images_per_class=args.images_per_class,
        faug_ops=args.faug_ops,
        faug_copies=args.faug_copies,
        min_conf=args.min_conf,
        seed=args.seed,
        device=device,
        generator_options=generator_options(args),
        faug_params=faug_params,
        filter=not args.no_filter,
        balance=args.balance,
        max_oversample=args.max_oversample,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
        force=args.force,
    )
    filt = ds.meta.get("filter", {})
    print(f"server dataset: {Path(args.out).resolve()} ({len(ds)} images, {int(ds.clean_mask().sum())} clean, hash {ds.content_hash()[:12]})")
    if filt.get("enabled"):
        print(f"teacher filter: kept {filt['kept']}/{filt['generated']} ({100 * filt['kept_share']:.1f}%)")
    return 0


def cmd_inspect(args) -> int:
    from clipfed_strategy.server_dataset import ServerDataset

    from .inspection import counts_table, provenance_text, write_contact_sheets

    ds = ServerDataset.load(args.dir)
    print(provenance_text(ds))
    print()
    print(counts_table(ds))
    if not args.no_sheets:
        sheet_dir = Path(args.sheet_dir) if args.sheet_dir else Path(args.dir) / "sheets"
        paths = write_contact_sheets(ds, sheet_dir, args.per_row)
        print(f"\ncontact sheets: {len(paths)} PNGs in {sheet_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipfed-synth", description="Build or inspect CLIP-Fed's server dataset.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_inspect(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m data_synth`` and the ``clipfed-synth`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_build(args) if args.command == "build" else cmd_inspect(args)
    except ValueError as e:  # SynthError, FreqAugError, ServerDatasetError, TeacherLoadError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
