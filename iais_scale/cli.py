"""The command-line entry points: ``iais-train`` (= ``launchers/train.py``) and ``iais-evaluate``
(= ``launchers/evaluate.py``); ``iais-data`` is ``python -m data_tools``. They parse their arguments
before importing torch, DeepSpeed or transformers, so ``--help`` and argument errors are instant.

Under a launcher (``deepspeed``, ``torchrun``, ``srun`` through ``launchers/slurm.sh``) every rank runs
the same command; started plainly, ``iais-train`` is a world of one rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from .preemption import Preemption, StopTraining

TRAIN_DOC = """Train: [deepspeed [--num_gpus N]] iais-train --config demo|configs/X.yaml [--resume auto] [key.sub=value ...]

--config takes a YAML path or the name of a shipped experiment (demo, flickr30k_uniter_base_iais, ...)."""

EVALUATE_DOC = """Evaluate a checkpoint on a data split: retrieval (all pairs and/or ITC top-k re-ranking), ISD beside
attention entropies, relation swaps.

    [deepspeed --num_gpus N | accelerate launch | torchrun | python] iais-evaluate \\
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


def train(argv: Sequence[str] | None = None, preemption: Preemption | None = None) -> int:
    """``iais-train`` / ``launchers/train.py``."""
    # First, before the heavy imports: a stop request (Ctrl-C, SIGTERM, the launcher's death) during
    # start-up is kept, and the run stops at its first agreement point instead of dying unsaved.
    if preemption is None:
        preemption = Preemption(int(os.environ.get("RANK", "0")))
        preemption.install()
    parser = argparse.ArgumentParser(prog="iais-train", description=TRAIN_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML, or the name of a shipped one (demo)")
    parser.add_argument(
        "--resume",
        default=None,
        help="none | auto (newest complete checkpoint in train.output_dir) | a checkpoint folder;"
        " default: auto under SLURM (a requeued job continues), else train.resume",
    )
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    _single_rank_defaults()

    # The heavy imports (torch, DeepSpeed, transformers), now that the stop handling is in place.
    from . import checkpoint, config, engine

    try:
        cfg = config.load_config(args.config, args.overrides)
        engine.run(cfg, resume=_resume(args.resume, cfg), preemption=preemption)
    except (config.ConfigError, checkpoint.CheckpointError) as e:
        # One list, printed once per node (every rank finds the same; a node of its own may not),
        # with the files checked too where the values failed: one round of fixes, not three.
        if isinstance(e, config.ConfigError) and e.config is not None:
            inputs = _input_problems(engine.check_inputs, e.config, args.resume)
            e = config.ConfigError(list(dict.fromkeys(e.problems + inputs)))
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(e, file=sys.stderr)
        return 2
    except StopTraining as e:
        return e.code
    return 0


def _resume(option: str | None, cfg) -> str:
    """--resume, else ``auto`` under SLURM (a requeued job continues), else ``train.resume``."""
    return option or ("auto" if os.environ.get("SLURM_JOB_ID") else cfg.train.resume)


def _input_problems(check_inputs, cfg, resume: str | None) -> list[str]:
    """The data, tokenizer, weights and output-folder problems of a config whose values failed."""
    try:
        return check_inputs(cfg, int(os.environ.get("WORLD_SIZE", "1")), _resume(resume, cfg))
    except Exception as e:  # values too broken to look for the files they name
        return [f"(inputs not checked: {type(e).__name__}: {e})"]


def _single_rank_defaults() -> None:
    """Started without a launcher (no RANK and no scheduler's rank variables): a world of one rank on
    this machine, as ``torchrun --nproc_per_node 1`` would set it up."""
    launched = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if any(v in os.environ for v in launched):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iais-evaluate", description=EVALUATE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--isd-alignments", nargs="+", metavar="ALIGNMENT",
                   help="ISD alignments to report (default: all of iais.ALIGNMENTS)")
    p.add_argument("--max-text-len", type=int, help="default: the run's data.max_text_len, else the tokenizer's")
    p.add_argument("--max-regions", type=int, help="default: the run's data.max_regions, else the split's largest")
    p.add_argument("--model-dir", help="config + tokenizer folder of a DeepSpeed checkpoint (default: {run}/model)")
    p.add_argument("--trust-pickles", action="store_true",
                   help="load DeepSpeed files that need more than the allow-list (only checkpoints you trust)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed
    return p


def _eval_distributed():
    """A process group when a launcher started several ranks (env://), else a single rank."""
    import torch
    import torch.distributed as dist

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
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(local_world, 1)))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def evaluate(argv: Sequence[str] | None = None) -> int:
    """``iais-evaluate`` / ``launchers/evaluate.py``: see ``EVALUATE_DOC``."""
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    import torch.distributed as dist

    from . import checkpoint, evaluate as ev, iais, metrics, viz
    from .data import storage

    args.isd_alignments = args.isd_alignments or list(iais.ALIGNMENTS)
    unknown = [a for a in args.isd_alignments if a not in iais.ALIGNMENTS]
    if unknown:
        parser.error(f"--isd-alignments: unknown {unknown}; choose from {list(iais.ALIGNMENTS)}")
    rank, world, device = _eval_distributed()
    log = logging.getLogger("iais_scale.evaluate")
    metrics.setup_logging(rank)
    try:
        model, tokenizer, info = checkpoint.load_model(args.checkpoint, args.model_dir, device=device,
                                            trust_pickles=args.trust_pickles)
        run_data = ev.experiment_data_config(info.run_dir)
        collator = ev.model_collator(
            tokenizer, model.config, max_text_len=ev.text_length(args.max_text_len, run_data, tokenizer, model.config),
            max_regions=args.max_regions or run_data.get("max_regions"))
        swap = None
        if args.swap_split and args.swap_split.lower() != "none":
            swap = storage.join(args.data, args.swap_split)
            if not storage.exists(swap):
                if args.swap_split != parser.get_default("swap_split"):
                    raise FileNotFoundError(f"--swap-split {args.swap_split}: no such split in {args.data}")
                swap = None
        data = ev.build_eval_data(collator, storage.join(args.data, args.split), swap, max_images=args.max_images)
        log.info("evaluating %s: %s (%s, %s) on %s/%s: %d images, %d ranks", args.checkpoint, info.folder, info.kind,
                 info.how, args.data, args.split, len(data.rset.images), world)
        report = ev.evaluate(model, data, batch_size=args.batch_size, isd_alignments=args.isd_alignments,
                             rerank_k=args.rerank_k, all_pairs=not args.no_all_pairs)
        report["checkpoint"] = {"kind": info.kind, "path": str(info.folder), "model_dir": str(info.model_dir),
                                "run_dir": str(info.run_dir) if info.run_dir else None, "step": info.step,
                                "chosen": info.how}
        report["data"] = {"root": str(args.data), "split": args.split, "swap_split": args.swap_split if swap else None}
        report["ranks"] = world
        if rank == 0:
            out = Path(args.out) if args.out else Path(info.run_dir or info.folder) / f"eval-{args.split}"
            ev.write_report(report, out, step=info.step)
            print(ev.markdown_table(report), flush=True)
            print(f"report: {out / 'eval.json'}", flush=True)
            if args.plots:
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
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0
