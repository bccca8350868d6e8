"""Pictures: the relation matrices of matched pairs, and metrics over training.

``python -m iais_scale.viz pairs --checkpoint PATH --data DIR --split test --index 0 3 --out DIR``
draws, for image i of the split with its caption (``--caption``, default 0), one PNG per evaluated
layer (``config.iais_layers``): the image with its region boxes numbered (read from the shard's
``.png``/``.jpg`` member; an empty frame with the boxes when the shard has no pixels), S_L, S_V,
A_t2i, A_i2t and the mapped matrices P_L, P_V of each alignment, words on the text axes and region
numbers (the numbers of the boxes) on the image axes.

``python -m iais_scale.viz curves --run DIR --out DIR`` plots RSUM, ISD and the attention entropies
over training steps from the run's ``eval_history.jsonl`` and ``train_log.jsonl``.

Everything renders with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import iais
from .checkpoint import load_model
from .data import format as fmt, storage
from .data.samples import ImageSample
from .data.shards import read_shard, resolve_split
from .evaluate import build_eval_data, experiment_data_config, model_collator, text_length
from .model import IaisRequest

ALIGNMENTS = iais.ALIGNMENTS


# --------------------------------------------------------------------------- pure helpers


def pair_matrices(rel: iais.RelationMatrices, b: int = 0, alignments: Sequence[str] = ALIGNMENTS) -> dict:
    """The matrices of pair ``b`` cropped to its valid words/regions, as numpy arrays.

    Keys: ``S_L`` [T, T], ``S_V`` [V, V], ``A_t2i`` [T, V], ``A_i2t`` [V, T], ``P_L/{alignment}``
    [T, T] and ``P_V/{alignment}`` [V, V] (spec section 2), ``ISD_L/{alignment}``,
    ``ISD_V/{alignment}`` and ``entropy/{name}`` (floats), ``word_pos`` / ``region_pos`` (sequence
    positions of the rows). Valid slots are packed to the front (``iais``), so cropping is slicing.
    """
    t = int(rel.word_mask[b].sum())
    v = int(rel.region_mask[b].sum())
    out: dict = {
        "S_L": rel.s_l[b, :t, :t],
        "S_V": rel.s_v[b, :v, :v],
        "A_t2i": rel.t2i[b, :t, :v],
        "A_i2t": rel.i2t[b, :v, :t],
        "word_pos": rel.word_pos[b, :t],
        "region_pos": rel.region_pos[b, :v],
    }
    for a in alignments:
        for d, n in (("L", t), ("V", v)):
            _, p_x, _ = iais._mapped(rel, a, d)
            out[f"P_{d}/{a}"] = p_x[b, :n, :n]
            out[f"ISD_{d}/{a}"] = float(iais.isd(rel, alignment=a, direction=d)[b].detach())
    for name, value in iais.attention_entropy(rel).items():
        out[f"entropy/{name}"] = float(value[b].detach())
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def shard_images(split: str | Path, keys: Sequence[str]) -> dict[str, bytes]:
    """The encoded image member (``.png``/``.jpg``/``.webp``) of each sample key found in the split,
    read by the one shard reader (only the bytes; nothing is unpickled)."""
    wanted, found = set(keys), {}
    for url in resolve_split(str(split), need_sizes=False).urls:
        for raw in read_shard(url):
            ext = next((e for e in fmt.IMAGE_EXTS if e in raw), None)
            if raw["__key__"] in wanted and ext is not None:
                found[raw["__key__"]] = raw[ext]
        if len(found) == len(wanted):
            break
    return found


# --------------------------------------------------------------------------- drawing


def _heatmap(fig: Figure, ax, m: np.ndarray, title: str, rows: list[str], cols: list[str]) -> None:
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=max(float(m.max()) if m.size else 0.0, 1e-6), aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)


def _image_panel(ax, sample: ImageSample, image: bytes | None, n_regions: int = 0) -> None:
    if image is not None:
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"{sample.key}: image and regions", fontsize=9)
    else:
        ax.imshow(np.full((sample.height, sample.width, 3), 235, np.uint8))
        ax.set_title(f"{sample.key}: regions (no pixels in shard)", fontsize=9)
    boxes = sample.boxes.tolist() if sample.boxes is not None and len(sample.boxes) else _grid_boxes(sample, n_regions)
    colours = [f"C{i % 10}" for i in range(len(boxes))]
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colours[i], lw=1.5))
        ax.text(x1, y1, str(i), color="white", fontsize=7, va="top", ha="left",
                bbox={"facecolor": colours[i], "pad": 0.8, "lw": 0})
    ax.set_xticks([])
    ax.set_yticks([])


def _grid_boxes(sample: ImageSample, n: int) -> list[tuple[float, float, float, float]]:
    """A pixel model's image tokens as the cells of its square grid, row by row (r0 top left), so that
    the heatmaps' r0..r{n-1} can be found in the image; none when n is no square."""
    side = math.isqrt(n)
    if n == 0 or side * side != n:
        return []
    w, h = sample.width / side, sample.height / side
    return [(c * w, r * h, (c + 1) * w, (r + 1) * h) for r in range(side) for c in range(side)]


def draw_pair(
    mats: dict,
    words: list[str],
    sample: ImageSample,
    caption: str,
    image: bytes | None,
    out_path: str | Path,
    *,
    layer: int,
    alignments: Sequence[str] = ALIGNMENTS,
) -> Path:
    """One PNG: row 0 image + A_t2i + A_i2t, row 1 S_L and its mapped P_L per alignment, row 2 S_V
    and its P_V per alignment; ISD and normalised entropy (H) in the titles."""
    regions = [f"r{int(i)}" for i in range(len(mats["region_pos"]))]
    n_cols = max(3, 1 + len(alignments))
    fig = Figure(figsize=(4.2 * n_cols, 12.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, n_cols, squeeze=False)
    _image_panel(axes[0][0], sample, image, len(regions))
    _heatmap(fig, axes[0][1], mats["A_t2i"], f"A_t2i word->region (H={mats['entropy/A_t2i']:.3f})", words, regions)
    _heatmap(fig, axes[0][2], mats["A_i2t"], f"A_i2t region->word (H={mats['entropy/A_i2t']:.3f})", regions, words)
    for ax in axes[0][3:]:
        ax.axis("off")
    for row, (d, labels) in enumerate((("L", words), ("V", regions)), start=1):
        _heatmap(fig, axes[row][0], mats[f"S_{d}"], f"S_{d} (H={mats[f'entropy/S_{d}']:.3f})", labels, labels)
        for j, a in enumerate(alignments, start=1):
            _heatmap(fig, axes[row][j], mats[f"P_{d}/{a}"], f"P_{d} {a} (ISD_{d}={mats[f'ISD_{d}/{a}']:.4f})", labels, labels)
        for ax in axes[row][1 + len(alignments) :]:
            ax.axis("off")
    fig.suptitle(f'layer {layer}: "{caption}"  (rows: query tokens; H = normalised row entropy, 1 = uniform)', fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    return out_path


@torch.no_grad()
def draw_pairs(
    model,
    tokenizer,
    collator,
    samples: Sequence[ImageSample],
    indices: Sequence[int],
    out_dir: str | Path,
    *,
    split_dir: str | Path | None = None,
    caption_index: int = 0,
    alignments: Sequence[str] = ALIGNMENTS,
) -> list[Path]:
    """For each image index, its caption ``caption_index`` through the model: one PNG per IAIS layer
    (``pair{index}_layer{l}.png``). Pixels come from the shards of ``split_dir`` when they have any."""
    bad = [i for i in indices if not 0 <= i < len(samples)]
    if bad:
        raise IndexError(f"image indices {bad} outside the {len(samples)} samples read")
    chosen = [samples[i] for i in indices]
    images = shard_images(split_dir, [s.key for s in chosen]) if split_dir is not None else {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    paths = []
    try:
        for index, sample in zip(indices, chosen):
            caption = sample.captions[min(caption_index, len(sample.captions) - 1)]
            inputs = {**collator.texts([caption]), **collator.images([sample])}
            inputs = {k: v.to(device) for k, v in inputs.items()}
            out = model(**inputs, iais_request=IaisRequest(torch.arange(1, device=device), alignment=None))
            for layer, rel in zip(model.config.resolved_iais_layers(), out.relations):
                mats = pair_matrices(rel, 0, alignments)
                words = tokenizer.convert_ids_to_tokens(inputs["text_ids"][0, mats["word_pos"]].tolist())
                paths.append(
                    draw_pair(mats, words, sample, caption, images.get(sample.key),
                              Path(out_dir) / f"pair{index}_layer{layer}.png", layer=layer, alignments=alignments)
                )
    finally:
        model.train(was_training)
    return paths


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; a missing file is no records, a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def draw_curves(run_dir: str | Path, out_dir: str | Path, histories: Sequence[str | Path] | None = None) -> Path:
    """``curves.png``: the training losses, RSUM (all-pairs, ITC, re-ranking), ISD and attention
    entropies over steps.

    Evaluation points come from ``histories`` (default: the run's ``eval_history.jsonl``; records
    without a step are skipped), training curves from the run's ``train_log.jsonl`` (the ISD and
    entropies of the training batches at the IAIS layers).
    """
    run_dir = Path(run_dir)
    train = [r for r in read_jsonl(run_dir / "train_log.jsonl") if "step" in r]
    evals = []
    for h in histories if histories is not None else [run_dir / "eval_history.jsonl"]:
        evals += [r for r in read_jsonl(h) if r.get("step") is not None]
    evals.sort(key=lambda r: r["step"])
    if not train and not evals:
        raise FileNotFoundError(f"{run_dir}: no train_log.jsonl or eval_history.jsonl records to plot")

    fig = Figure(figsize=(22, 4.8))
    FigureCanvasAgg(fig)
    ax_l, ax_r, ax_i, ax_e = fig.subplots(1, 4)
    for k in ("loss", "mlm", "itm_rank", "itc", "mrfr"):  # the total and its parts, as logged
        pts = [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
        if pts:
            ax_l.plot(*zip(*pts), lw=1.5 if k == "loss" else 1, label=k)
    ax_l.set_title("training loss (logging windows)")
    ax_l.set_xlabel("step")
    steps = [r["step"] for r in evals]
    for name, get in (
        ("all pairs", lambda r: r.get("rsum") if r.get("protocol", "all_pairs") == "all_pairs" else None),
        ("ITC only", lambda r: r.get("itc", {}).get("rsum")),
        ("ITC + re-rank", lambda r: r.get("rerank", {}).get("rsum")),
    ):
        pts = [(s, get(r)) for s, r in zip(steps, evals) if get(r) is not None]
        if pts:
            ax_r.plot(*zip(*pts), marker="o", label=name)
    ax_r.set_title("RSUM (evaluation)" + ("" if len(evals) > 1 else f" - {len(evals)} evaluation point(s)"))
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("RSUM (max 600)")

    rel_keys = sorted({k for r in evals for k in r.get("relations", {})})
    for k in (k for k in rel_keys if "/isd" in k):
        pts = [(s, r["relations"][k]["mean"]) for s, r in zip(steps, evals) if k in r.get("relations", {})]
        ax_i.plot(*zip(*pts), marker="o", label=f"eval {k}")
    for k in ("isd", "iais"):
        pts = [(r["step"], r[k]) for r in train if k in r]
        if pts:
            ax_i.plot(*zip(*pts), lw=1, alpha=0.8, label=f"train {k} (batches)")
            break
    ax_i.set_yscale("log")
    ax_i.set_title("ISD (mean over matched pairs)")
    ax_i.set_xlabel("step")

    for k in (k for k in rel_keys if "/entropy/" in k):
        pts = [(s, r["relations"][k]["mean"]) for s, r in zip(steps, evals) if k in r.get("relations", {})]
        ax_e.plot(*zip(*pts), marker="o", label=f"eval {k}")
    for k in sorted({k for r in train for k in r if k.startswith("entropy_")}):
        pts = [(r["step"], r[k]) for r in train if k in r]
        ax_e.plot(*zip(*pts), lw=1, alpha=0.8, label=f"train {k}")
    ax_e.axhline(0.98, color="grey", ls="--", lw=1, label="0.98: degenerate if all above")
    ax_e.set_title("normalised attention entropy (1 = uniform)")
    ax_e.set_xlabel("step")
    for ax in (ax_l, ax_r, ax_i, ax_e):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    out = Path(out_dir) / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iais_scale.viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pairs", help="relation matrices of matched pairs")
    p.add_argument("--checkpoint", required=True, help="HF model folder, or a DeepSpeed checkpoints/ or tag folder")
    p.add_argument("--model-dir", help="config + tokenizer folder for a DeepSpeed checkpoint (default: the run's model/)")
    p.add_argument("--data", required=True, help="data set folder")
    p.add_argument("--split", default="test")
    p.add_argument("--index", type=int, nargs="+", default=[0], help="image indices within the split")
    p.add_argument("--caption", type=int, default=0, help="which caption of each image")
    p.add_argument("--alignments", nargs="+", default=list(ALIGNMENTS), choices=ALIGNMENTS)
    p.add_argument("--max-text-len", type=int, help="default: the run's data.max_text_len, else the tokenizer's")
    p.add_argument("--out", required=True)
    c = sub.add_parser("curves", help="RSUM, ISD and entropies over training")
    c.add_argument("--run", required=True, help="run folder (train_log.jsonl, eval_history.jsonl)")
    c.add_argument("--out", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "curves":
        print(draw_curves(args.run, args.out))
        return 0

    model, tokenizer, info = load_model(args.checkpoint, args.model_dir)
    run_data = experiment_data_config(info.run_dir)
    split = storage.join(args.data, args.split)
    collator = model_collator(tokenizer, model.config,
                             max_text_len=text_length(args.max_text_len, run_data, tokenizer, model.config),
                             max_regions=run_data.get("max_regions"))
    samples = build_eval_data(collator, split, max_images=max(args.index) + 1).rset.images
    for path in draw_pairs(model, tokenizer, collator, samples, args.index, args.out, split_dir=split,
                           caption_index=args.caption, alignments=args.alignments):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
