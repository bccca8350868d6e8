"""Benchmark of the IAIS term: batched library vs the plain per-sample reference loop.

Forward + backward of ``iais.relation_matrices`` + ``iais.iais_loss(alignment="singular",
direction="both")`` against the same quantity through tests/iais_reference.py (a Python loop over the
pairs, four full q k^T per pair), at B=32 pairs, H=12 heads, d=64, N=100 positions, 10-58 words and
10-36 regions per pair at scattered positions.

    python benchmarks/iais_term.py [--device cpu|cuda] [--threads 1] [--repeats N]

Targets: >= 3x on one CPU thread, >= 20x on a GPU.
"""
from __future__ import annotations

import argparse
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


def timed(fn, device: str, warmup: int, repeats: int) -> list[float]:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
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

    # sanity: same loss and gradients
    loss_b = batched()().detach()
    gq_b = q.grad.clone()
    loss_r = reference().detach()
    gq_r = q.grad.clone()
    rel_err = (loss_b - loss_r).abs().item() / max(loss_r.abs().item(), 1e-12)
    grad_err = ((gq_b - gq_r).abs().max() / gq_r.abs().max()).item()

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"IAIS term (singular, both), forward+backward: B={B} H={H} N={N} d={D}, "
          f"words {min(words)}-{max(words)}, regions {min(regions)}-{max(regions)}; device: {dev_name}; "
          f"torch {torch.__version__}")
    print(f"check: loss batched {loss_b.item():.6f} vs reference {loss_r.item():.6f} (rel diff {rel_err:.1e}); "
          f"max |grad q| diff / max |grad q| = {grad_err:.1e}")

    # The model passes static bounds on the counts (its collator knows the padded lengths), which is
    # what lets the blocks be compact without a host sync; the call without them falls back to N.
    bounds = dict(max_words=WORDS[1], max_regions=REGIONS[1])
    t_ref = statistics.median(timed(reference, device, args.warmup, args.repeats))
    t_bat = statistics.median(timed(batched(**bounds), device, args.warmup, args.repeats))
    t_unb = statistics.median(timed(batched(), device, args.warmup, args.repeats))
    print(f"per-sample reference loop:           {t_ref:9.2f} ms (median of {args.repeats})")
    print(f"batched, max_words={WORDS[1]} max_regions={REGIONS[1]}: {t_bat:9.2f} ms  speed-up {t_ref / t_bat:.1f}x")
    print(f"batched, no bounds (T = V = N):      {t_unb:9.2f} ms  speed-up {t_ref / t_unb:.1f}x")
    target = 20.0 if device == "cuda" else 3.0
    print(f"target >= {target:.0f}x: {'met' if t_ref / t_bat >= target else 'NOT met'}")
    return 0 if math.isfinite(t_bat) else 1


if __name__ == "__main__":
    sys.exit(main())
