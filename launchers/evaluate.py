"""Evaluate a checkpoint on a data split: retrieval (all pairs and/or ITC top-k re-ranking), ISD beside
attention entropies, relation swaps.

    [deepspeed --num_gpus N | accelerate launch | torchrun | python] launchers/evaluate.py \\
        --checkpoint PATH --data DIR [--split test] [--swap-split swap] [--out DIR] [--rerank-k K] \\
        [--plots] [--batch-size N]

PATH is a Hugging Face model folder (config.json + model.safetensors + tokenizer files), a run folder,
its ``checkpoints/`` folder (the newest complete checkpoint) or one complete ``checkpoints/step{N}``
folder, consolidated with DeepSpeed's ``zero_to_fp32`` (any ZeRO stage); its config and tokenizer
come from the run's ``model/`` folder (``--model-dir`` to override). Under a launcher
(``WORLD_SIZE`` > 1) every rank scores an equal share of the pairs; plain ``python`` is one rank.
Rank 0 writes ``eval.json``, ``eval.md`` and appends to ``eval_history.jsonl`` in ``--out`` (default:
``{run folder or model folder}/eval-{split}``) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from iais_scale import evaluate as ev
from iais_scale.checkpoint import CheckpointError, load_model
from iais_scale.data import storage
from iais_scale.iais import ALIGNMENTS

log = logging.getLogger("iais_scale.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF model folder, or a DeepSpeed checkpoints/ or tag folder")
    p.add_argument("--data", required=True, help="data set folder (holding one folder of shards per split)")
    p.add_argument("--split", default="test", help="retrieval split (default: test)")
    p.add_argument("--swap-split", default="swap",
                   help="relation-swap split; skipped when the data set has none; 'none' to turn off")
    p.add_argument("--out", help="report folder (default: {run or model folder}/eval-{split})")
    p.add_argument("--rerank-k", type=int, help="also re-rank the top K ITC candidates of every query")
    p.add_argument("--no-all-pairs", action="store_true",
                   help="skip all-pairs scoring (with --rerank-k: the headline metrics are the re-ranked ones)")
    p.add_argument("--plots", action="store_true", help="also draw relation pictures and training curves")
    p.add_argument("--plot-index", type=int, nargs="+", default=[0, 1], help="image indices for --plots")
    p.add_argument("--batch-size", type=int, default=512, help="pairs per forward pass")
    p.add_argument("--max-images", type=int, help="evaluate on the first N images of the split")
    p.add_argument("--isd-alignments", nargs="+", default=list(ALIGNMENTS), choices=ALIGNMENTS)
    p.add_argument("--max-text-len", type=int, help="default: the run's data.max_text_len, else the tokenizer's")
    p.add_argument("--max-regions", type=int, help="default: the run's data.max_regions, else the split's largest")
    p.add_argument("--model-dir", help="config + tokenizer folder of a DeepSpeed checkpoint (default: {run}/model)")
    p.add_argument("--trust-pickles", action="store_true",
                   help="load DeepSpeed files that need more than the allow-list (only checkpoints you trust)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed
    return p


def init_distributed() -> tuple[int, int, torch.device]:
    """A process group when a launcher started several ranks (env://), else a single rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s")
    try:
        model, tokenizer, info = load_model(args.checkpoint, args.model_dir, device=device,
                                            trust_pickles=args.trust_pickles)
        run_data = ev.experiment_data_config(info.run_dir)
        collator = ev.eval_collator(
            tokenizer, model.config, max_text_len=ev.text_length(args.max_text_len, run_data, tokenizer, model.config),
            max_regions=args.max_regions or run_data.get("max_regions"))
        swap = None
        if args.swap_split and args.swap_split.lower() != "none":
            swap = storage.join(args.data, args.swap_split)
            if not storage.exists(swap):
                if args.swap_split != build_parser().get_default("swap_split"):
                    raise FileNotFoundError(f"--swap-split {args.swap_split}: no such split in {args.data}")
                swap = None
        data = ev.build_eval_data(collator, storage.join(args.data, args.split), swap, max_images=args.max_images)
        log.info("evaluating %s (%s) on %s/%s: %d images, %d ranks", args.checkpoint, info.kind, args.data,
                 args.split, len(data.rset.images), world)
        report = ev.evaluate(model, data, batch_size=args.batch_size, isd_alignments=args.isd_alignments,
                             rerank_k=args.rerank_k, all_pairs=not args.no_all_pairs)
        report["checkpoint"] = {"kind": info.kind, "path": str(info.folder), "model_dir": str(info.model_dir),
                                "run_dir": str(info.run_dir) if info.run_dir else None, "step": info.step}
        report["data"] = {"root": str(args.data), "split": args.split, "swap_split": args.swap_split if swap else None}
        report["ranks"] = world
        if rank == 0:
            out = Path(args.out) if args.out else Path(info.run_dir or info.folder) / f"eval-{args.split}"
            ev.write_report(report, out, step=info.step)
            print(ev.markdown_table(report), flush=True)
            print(f"report: {out / 'eval.json'}", flush=True)
            if args.plots:
                from iais_scale import viz

                plots = out / "plots"
                samples = data.rset.images
                paths = viz.draw_pairs(model, tokenizer, collator, samples,
                                       [i for i in args.plot_index if i < len(samples)], plots,
                                       split_dir=storage.join(args.data, args.split), alignments=args.isd_alignments)
                histories = [out / "eval_history.jsonl"]
                run_dir = Path(info.run_dir) if info.run_dir else out
                if (run_dir / "eval_history.jsonl").resolve() != histories[0].resolve():
                    histories.append(run_dir / "eval_history.jsonl")
                try:
                    paths.append(viz.draw_curves(run_dir, plots, histories))
                except FileNotFoundError as e:  # e.g. a stand-alone HF folder: no steps to plot against
                    print(f"curves: not drawn ({e})", flush=True)
                print("plots: " + " ".join(str(p) for p in paths), flush=True)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
