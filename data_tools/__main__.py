"""``python -m data_tools {demo,relations,verify,stats,karpathy,coco,table,features,uniter,entities}``.

``features --backbone NAME_OR_FOLDER --images-from SHARDS_DIR --out DIR`` runs a frozen vision
backbone over the images of existing shards and writes its grid cells as region features with
their geometry (docs/models.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from iais_scale.data.demo import make_demo
from iais_scale.data.format import Manifest
from iais_scale.data.relations import make_relations

from . import coco, entities, features, karpathy, table, uniter
from .stats import compute_stats, format_table
from .verify import verify


def _generate(args: argparse.Namespace) -> int:
    """``demo`` and ``relations``: make the synthetic data set, say what it holds."""
    if args.command == "demo":
        make, sizes = make_demo, dict(n_train=args.n_train)
    else:
        make = make_relations
        sizes = dict(n_train_pairs=args.n_train_pairs, captions_per_image=args.captions_per_image)
    start = time.perf_counter()
    out = make(args.out, seed=args.seed, n_val=args.n_val, n_test=args.n_test, n_swap_groups=args.n_swap_groups,
               shard_size=args.shard_size, overwrite=args.overwrite, **sizes)
    counts = ", ".join(f"{name} {n}" for name, n in Manifest.read(out).splits.items())
    what = "demo data set" if args.command == "demo" else "relation benchmark"
    print(f"{what} in {out} ({counts}) ready in {time.perf_counter() - start:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    return 1 if verify(args.dir, workers=args.workers) else 0


def _stats(args: argparse.Namespace) -> int:
    stats, n_problems = compute_stats(args.dir, workers=args.workers)
    print(json.dumps(stats, indent=2) if args.json else format_table(stats))
    if n_problems:
        print(f"warning: {n_problems} problem(s) met; run `python -m data_tools verify {args.dir}`", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate the synthetic demo data set")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n-train", type=int, default=3000)
    demo.add_argument("--n-val", type=int, default=100)
    demo.add_argument("--n-test", type=int, default=100)
    demo.add_argument("--n-swap-groups", type=int, default=100)
    demo.add_argument("--shard-size", type=int, default=500)
    demo.add_argument("--overwrite", action="store_true", help="replace demo data made with other parameters")
    demo.set_defaults(func=_generate)

    rel = sub.add_parser("relations", help="generate the relation benchmark (swap pairs, relation-swap groups)",
                         description="Synthetic scenes whose captions need their spatial relation: training images in"
                         " swap pairs, 1,000-image retrieval test, 1,000 Winoground groups, relation spans marked"
                         " (iais_scale/data/relations.py).")
    rel.add_argument("--out", required=True, help="output folder")
    rel.add_argument("--seed", type=int, default=0)
    rel.add_argument("--n-train-pairs", type=int, default=2000, help="training swap pairs (2 images each)")
    rel.add_argument("--n-val", type=int, default=200)
    rel.add_argument("--n-test", type=int, default=1000, help="retrieval test images")
    rel.add_argument("--n-swap-groups", type=int, default=1000, help="relation-swap (Winoground) groups")
    rel.add_argument("--captions-per-image", type=int, default=1, help="captions of each val/test image")
    rel.add_argument("--shard-size", type=int, default=1000)
    rel.add_argument("--overwrite", action="store_true", help="replace relation data made with other parameters")
    rel.set_defaults(func=_generate)

    for name, func, help_text in (
        ("verify", _verify, "decode and check every sample; exit 1 on any problem"),
        ("stats", _stats, "per-split counts and caption / region statistics"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("dir", help="data set folder, or one split folder")
        p.add_argument("--workers", type=int, default=1, help="processes reading shards in parallel")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(func=func)

    for module in (karpathy, coco, table, features, uniter, entities):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:  # (ImportError: an optional package)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
