"""Benchmark of the IAIS term: batched library vs the plain per-sample reference loop.

Forward + backward of ``iais.relation_matrices`` + ``iais.iais_loss(alignment="singular",
direction="both")`` against the same quantity through tests/iais_reference.py (a Python loop over the
pairs, four full q k^T per pair), at B=32 pairs, H=12 heads, d=64, N=100 positions, 10-58 words and
10-36 regions per pair at scattered positions. The library is timed with the static bounds the model
passes (no host sync) and with its default (bounds read from the masks), and with bounds N.

    python benchmarks/iais_term.py [--device cpu|cuda] [--threads 1] [--repeats N] [--no-sync-check]

Targets: >= 3x on one CPU thread, >= 20x on a GPU. On CUDA the batched step (forward + backward) also
runs once under ``torch.cuda.set_sync_debug_mode("error")``: the static-bound path the model uses
must not synchronise with the host; the default path (bounds read from the masks) must, which shows
that the check can see a sync. The last line is ``RESULT {json}`` for benchmarks/gpu_suite.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(_ROOT, "tests"), _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import iais_reference as ref  # noqa: E402

from iais_scale import iais  # noqa: E402

B, H, D, N = 32, 12, 64, 100
WORDS = (10, 58)
REGIONS = (10, 36)


def make_inputs(device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(WORDS[0], WORDS[1] + 1, (B,), generator=g).tolist()
    regions = torch.randint(REGIONS[0], REGIONS[1] + 1, (B,), generator=g).tolist()
    text, image = ref.scattered_masks(words, regions, N, g)
    # The layout a layer's projections give: [B, N, H * d] viewed as [B, H, N, d] (as in BERT).
    q = torch.randn(B, N, H, D, generator=g).to(device).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, N, H, D, generator=g).to(device).transpose(1, 2).requires_grad_(True)
    return q, k, text.to(device), image.to(device), words, regions


def timed(fns: dict, device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, interleaved round by round so that a change in the
    machine's load (other processes) hits every variant alike."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def sync_check(steps: dict) -> dict[str, str]:
    """Each step once under ``torch.cuda.set_sync_debug_mode("error")``: "no host sync", or the
    first line of the error that the first synchronising call raised."""
    out = {}
    for name, fn in steps.items():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            verdict = "no host sync"
        except RuntimeError as e:
            verdict = "host sync: " + (str(e).strip().splitlines() or ["?"])[0][:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        out[name] = verdict
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sync-check", action=argparse.BooleanOptionalAction, default=None,
                    help="run the batched step under torch.cuda.set_sync_debug_mode('error') (default: on CUDA)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    q, k, text, image, words, regions = make_inputs(device, args.seed)

    def batched(**bounds):
        def step():
            q.grad = k.grad = None
            rel = iais.relation_matrices(q, k, text, image, **bounds)
            loss = iais.iais_loss(rel, alignment="singular", direction="both")
            loss.backward()
            return loss
        return step

    def reference():
        q.grad = k.grad = None
        loss = ref.reference_loss(q, k, text, image, alignment="singular", direction="both")
        loss.backward()
        return loss

    # The model passes static bounds (iais_scale/model/encoder.py): its text part of n_text positions
    # holds [CLS], the words and [SEP], the rest of the N positions the regions. No host sync, so it
    # can run in a CUDA graph. Without bounds the batch's largest counts are read from the masks (one
    # host read); bounds of N are what that default used to be (no compaction).
    n_text = WORDS[1] + 2
    model_bounds = dict(max_words=n_text - 2, max_regions=N - n_text)
    derived = (int(text.sum(1).max()), int(image.sum(1).max()))
    variants = {
        "per-sample reference loop": reference,
        f"batched, static bounds as the model passes them {tuple(model_bounds.values())}": batched(**model_bounds),
        f"batched, default: bounds read from the masks {derived}": batched(),
        f"batched, bounds N {(N, N)} (the former default)": batched(max_words=N, max_regions=N),
    }

    result = {"device": device, "shape": {"B": B, "H": H, "N": N, "d": D, "words": list(WORDS), "regions": list(REGIONS)},
              "torch": torch.__version__, "repeats": args.repeats, "threads": torch.get_num_threads()}

    # sanity: same loss and gradients
    loss_r = reference().detach()
    gq_r = q.grad.clone()
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    result["device_name"] = dev_name
    print(f"IAIS term (singular, both), forward+backward: B={B} H={H} N={N} d={D}, "
          f"words {min(words)}-{max(words)}, regions {min(regions)}-{max(regions)}; device: {dev_name}; "
          f"torch {torch.__version__}")
    for name, fn in list(variants.items())[1:3]:
        loss_b = fn().detach()
        rel_err = (loss_b - loss_r).abs().item() / max(loss_r.abs().item(), 1e-12)
        grad_err = ((q.grad - gq_r).abs().max() / gq_r.abs().max()).item()
        print(f"check, {name}: loss {loss_b.item():.6f} vs reference {loss_r.item():.6f} (rel diff {rel_err:.1e}); "
              f"max |grad q| diff / max |grad q| = {grad_err:.1e}")
        result.setdefault("check", []).append({"variant": name, "loss_rel_diff": rel_err, "grad_rel_diff": grad_err})

    if args.sync_check is None:
        args.sync_check = device == "cuda"
    if args.sync_check and device == "cuda":
        result["sync_check"] = sync_check({"static_bounds": variants[list(variants)[1]],
                                           "default_bounds": variants[list(variants)[2]]})
        for name, verdict in result["sync_check"].items():
            print(f"sync check (set_sync_debug_mode('error')), batched {name}: {verdict}")
    else:
        result["sync_check"] = {"skipped": "set_sync_debug_mode is CUDA-only" if device != "cuda" else "--no-sync-check"}

    times = timed(variants, device, args.warmup, args.repeats)
    t_ref, t_bat, t_def, _ = (statistics.median(t) for t in times.values())
    width = max(map(len, variants))
    for name, t in times.items():
        t = statistics.median(t)
        print(f"{name:<{width}} {t:9.2f} ms  speed-up {t_ref / t:4.1f}x")
    print(f"(medians of {args.repeats}, the variants interleaved)")
    target = 20.0 if device == "cuda" else 3.0
    print(f"target >= {target:.0f}x (static bounds): {'met' if t_ref / t_bat >= target else 'NOT met'}; "
          f"default {'met' if t_ref / t_def >= target else 'NOT met'}")
    keys = ("reference", "static_bounds", "default_bounds", "bounds_n")
    result["ms"] = {k: statistics.median(t) for k, t in zip(keys, times.values())}
    result["speedup_static"] = t_ref / t_bat
    result["speedup_default"] = t_ref / t_def
    result["target_speedup"] = target
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if math.isfinite(t_bat) and math.isfinite(t_def) else 1


if __name__ == "__main__":
    sys.exit(main())
