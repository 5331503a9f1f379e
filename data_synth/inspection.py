"""``python -m data_synth inspect``: counts, provenance and contact sheets of a server dataset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from clipfed_strategy.server_dataset import ServerDataset


def counts_table(ds: ServerDataset) -> str:
    """Class x variant count table as aligned text, with totals."""
    counts = ds.counts()
    variants = ds.variant_names
    w0 = max(5, *(len(c) for c in ds.class_names))
    widths = [max(len(v), 5) for v in variants]
    lines = ["class".ljust(w0) + "  " + "  ".join(v.rjust(w) for v, w in zip(variants, widths)) + "  total"]
    for cname in ds.class_names:
        row = counts[cname]
        lines.append(
            cname.ljust(w0) + "  " + "  ".join(str(row[v]).rjust(w) for v, w in zip(variants, widths)) + f"  {sum(row.values()):5d}"
        )
    totals = [sum(counts[c][v] for c in ds.class_names) for v in variants]
    lines.append("total".ljust(w0) + "  " + "  ".join(str(t).rjust(w) for t, w in zip(totals, widths)) + f"  {len(ds):5d}")
    return "\n".join(lines)


def provenance_text(ds: ServerDataset) -> str:
    """Generator, teacher, filter and augmentation summary from the manifest."""
    m = ds.meta
    gen = m.get("generator", {})
    teacher = m.get("teacher", {})
    filt = m.get("filter", {})
    faug = m.get("faug", {})
    lines = [
        f"images      : {len(ds)} at {ds.resolution[0]}x{ds.resolution[1]}x{ds.channels}, {ds.num_classes} classes",
        f"content hash: {ds.content_hash()}",
        f"generator   : {gen.get('name', '?')} ({gen.get('provenance', '')})",
        f"teacher     : {teacher.get('identity', '?')}" + ("  [STAND-IN, not CLIP]" if teacher.get("is_standin") else ""),
        f"seed        : {m.get('seed', '?')}",
    ]
    if filt.get("enabled"):
        lines.append(
            f"filter      : min_conf {filt.get('min_conf')}: kept {filt.get('kept')}/{filt.get('generated')} "
            f"({100 * filt.get('kept_share', 0):.1f}%), teacher top-1 on generated {100 * filt.get('teacher_top1', 0):.1f}%"
        )
        for cname, row in filt.get("per_class", {}).items():
            lines.append(f"  {cname:>12s}: kept {row['kept']}/{row['generated']} ({100 * row['kept_share']:.0f}%)")
    elif filt:
        lines.append("filter      : off")
    if faug:
        lines.append(f"augmentation: {','.join(faug.get('ops', [])) or 'none'} x {faug.get('copies')} (seed {faug.get('seed')})")
    if "build" in m:
        lines.append(f"build       : {m['build']}")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "class"


def contact_sheet(ds: ServerDataset, class_id: int, per_row: int = 12, tile: int = 48):
    """PIL image: one row per variant, columns = the first ``per_row`` clean sources of the class,
    each variant shown under its own source (blank where that variant is absent)."""
    from PIL import Image, ImageDraw

    clean = np.flatnonzero(ds.clean_mask() & (ds.labels == class_id))[:per_row]
    label_w = 8 * max(len(v) for v in ds.variant_names) + 8
    rows = len(ds.variant_names)
    sheet = Image.new("RGB", (label_w + per_row * (tile + 2), rows * (tile + 2) + 18), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"{ds.class_names[class_id]} ({len(clean)} shown)", fill=(0, 0, 0))
    for v, vname in enumerate(ds.variant_names):
        y = 18 + v * (tile + 2)
        draw.text((4, y + tile // 2 - 6), vname, fill=(0, 0, 0))
        for j, src in enumerate(clean):
            idx = np.flatnonzero((ds.variants == v) & (ds.source_index == src))
            if not len(idx):
                continue
            img = ds.images[idx[0]]
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
            sheet.paste(pil.resize((tile, tile), Image.Resampling.NEAREST), (label_w + j * (tile + 2), y))
    return sheet


def write_contact_sheets(ds: ServerDataset, sheet_dir, per_row: int = 12) -> list[Path]:
    """One PNG per class, ``<sheet_dir>/<index>-<class>.png``."""
    sheet_dir = Path(sheet_dir)
    sheet_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, cname in enumerate(ds.class_names):
        p = sheet_dir / f"{c:02d}-{_safe(cname)}.png"
        contact_sheet(ds, c, per_row).save(p)
        paths.append(p)
    return paths
