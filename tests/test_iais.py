"""Tests of the batched IAIS library (iais_scale.iais) against the plain per-sample reference in
tests/iais_reference.py (written independently from /work/shared/docs/iais-spec.md)."""
import math
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import iais_reference as ref  # noqa: E402

from iais_scale import iais  # noqa: E402

COMBOS = [(a, d) for a in ref.ALIGNMENTS for d in ref.DIRECTIONS]
MATRIX_NAMES = ("s_l", "s_v", "t2i", "i2t")

# main batch: pair 1 has one word, pair 2 one region, pair 3 no region, pair 5 no word
WORDS = [6, 1, 5, 4, 9, 0, 7]
REGIONS = [4, 3, 1, 0, 8, 3, 5]
VALID = [t > 0 and v > 0 for t, v in zip(WORDS, REGIONS)]
B, H, N, D = len(WORDS), 3, 32, 8


def make_batch(word_counts=WORDS, region_counts=REGIONS, n=N, h=H, d=D, seed=1234, dtype=torch.float32,
               scale=1.5):
    g = torch.Generator().manual_seed(seed)
    text, image = ref.scattered_masks(word_counts, region_counts, n, g)
    b = len(word_counts)
    q = (scale * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)).to(dtype)
    k = (scale * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)).to(dtype)
    return q, k, text, image


def padded_reference(mats, name, t_slots=None, v_slots=None):
    """Stack the reference's cropped per-pair matrices into the library's compacted layout
    (``t_slots``/``v_slots`` slots, default the largest counts of the batch; extra slots are 0)."""
    t_max = t_slots if t_slots is not None else max(m.word_pos.numel() for m in mats)
    v_max = v_slots if v_slots is not None else max(m.region_pos.numel() for m in mats)
    rows, cols = {"s_l": (t_max, t_max), "s_v": (v_max, v_max), "t2i": (t_max, v_max),
                  "i2t": (v_max, t_max)}[name]
    dt = getattr(mats[0], name).dtype
    out = torch.zeros(len(mats), rows, cols, dtype=dt)
    for b, m in enumerate(mats):
        x = getattr(m, name)
        out[b, :x.shape[0], :x.shape[1]] = x
    return out


def assert_rel_matches(rel, mats, rtol=1e-5, atol=1e-7, n=None):
    """T (V) may be any upper bound on the word (region) counts, at most N: a static bound passed as
    ``max_words`` (no host sync, spec section 6), else the batch's largest count read from the masks.
    The slots past each pair's count must be masked, position 0, and hold 0 in every matrix."""
    bsz = len(mats)
    t_max = max(m.word_pos.numel() for m in mats)
    v_max = max(m.region_pos.numel() for m in mats)
    t_slots, v_slots = rel.word_mask.shape[1], rel.region_mask.shape[1]
    assert t_slots >= t_max and v_slots >= v_max
    if n is not None:
        assert t_slots <= n and v_slots <= n
    assert rel.word_mask.shape == (bsz, t_slots) and rel.word_pos.shape == (bsz, t_slots)
    assert rel.region_mask.shape == (bsz, v_slots) and rel.region_pos.shape == (bsz, v_slots)
    assert rel.s_l.shape == (bsz, t_slots, t_slots)
    assert rel.s_v.shape == (bsz, v_slots, v_slots)
    assert rel.t2i.shape == (bsz, t_slots, v_slots)
    assert rel.i2t.shape == (bsz, v_slots, t_slots)
    for name in MATRIX_NAMES:
        x = getattr(rel, name)
        assert x.dtype == torch.float32
        assert torch.isfinite(x).all(), name
        want = padded_reference(mats, name, t_slots, v_slots).to(torch.float32)
        torch.testing.assert_close(x, want, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    word_mask = torch.zeros(bsz, t_slots, dtype=torch.bool)
    region_mask = torch.zeros(bsz, v_slots, dtype=torch.bool)
    word_pos = torch.zeros(bsz, t_slots, dtype=torch.long)
    region_pos = torch.zeros(bsz, v_slots, dtype=torch.long)
    for b, m in enumerate(mats):
        t, v = m.word_pos.numel(), m.region_pos.numel()
        word_mask[b, :t] = True
        region_mask[b, :v] = True
        word_pos[b, :t] = m.word_pos
        region_pos[b, :v] = m.region_pos
    assert rel.word_mask.dtype == torch.bool and rel.region_mask.dtype == torch.bool
    assert rel.word_pos.dtype == torch.long and rel.region_pos.dtype == torch.long
    assert torch.equal(rel.word_mask, word_mask)
    assert torch.equal(rel.region_mask, region_mask)
    assert torch.equal(rel.word_pos, word_pos)
    assert torch.equal(rel.region_pos, region_pos)


def lib_loss(q, k, text, image, alignment, direction, reduction):
    rel = iais.relation_matrices(q, k, text, image)
    return iais.iais_loss(rel, alignment=alignment, direction=direction, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# the reference itself (hand checks, independent of the library)


def test_reference_rows_are_distributions_and_kl_of_identical_is_zero():
    q, k, text, image = make_batch()
    for m in ref.reference_matrices(q, k, text, image):
        for name in MATRIX_NAMES:
            x = getattr(m, name)
            if x.numel():
                torch.testing.assert_close(x.sum(1), torch.ones(x.shape[0]), rtol=0, atol=1e-6)
        if m.valid:
            for a in ref.ALIGNMENTS:
                for x in "LV":
                    p = ref.mapped_matrix(m, a, x)
                    torch.testing.assert_close(p.sum(1), torch.ones(p.shape[0]), rtol=0, atol=1e-5)
            assert abs(ref.symmetric_kl(m.s_l, m.s_l, 0.0).item()) < 1e-6
            assert abs(ref.symmetric_kl(m.s_v, m.s_v, 0.0).item()) < 1e-6


def test_reference_hand_computed_cases():
    # H=1, d=1: words at 1, 3; regions at 2, 4; q, k chosen by hand
    q = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5]).view(1, 1, 5, 1)
    k = torch.tensor([0.0, 0.3, 1.0, -0.7, 0.2]).view(1, 1, 5, 1)
    text = torch.tensor([[False, True, False, True, False]])
    image = torch.tensor([[False, False, True, False, True]])
    s = (q[0, 0] @ k[0, 0].T)[:, :]  # d = 1
    w, r = [1, 3], [2, 4]

    def sm(rows, cols):
        return torch.softmax(s[rows][:, cols], dim=1)

    s_l, s_v, t2i, i2t = sm(w, w), sm(r, r), sm(w, r), sm(r, w)
    (m,) = ref.reference_matrices(q, k, text, image)
    for name, want in zip(MATRIX_NAMES, (s_l, s_v, t2i, i2t)):
        torch.testing.assert_close(getattr(m, name), want)

    def skl(a, b, eps):
        return ((b * (b.log() - (a + eps).log())).sum() + (a * (a.log() - (b + eps).log())).sum()) / a.shape[0]

    a_idx = t2i.argmax(1)
    b_idx = i2t.argmax(1)
    want = {
        ("singular", "L"): skl(s_l, torch.softmax(s_v[a_idx][:, a_idx], 1), 0.0),
        ("singular", "V"): skl(s_v, torch.softmax(s_l[b_idx][:, b_idx], 1), 0.0),
        ("distributed", "L"): skl(s_l, t2i @ i2t, 1e-6),
        ("distributed", "V"): skl(s_v, i2t @ t2i, 1e-6),
        ("congruence", "L"): skl(s_l, t2i @ s_v @ i2t, 1e-6),
        ("congruence", "V"): skl(s_v, i2t @ s_l @ t2i, 1e-6),
    }
    for (a, x), v in want.items():
        got = ref.reference_loss(q, k, text, image, alignment=a, direction=x)
        torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-7)
    got = ref.reference_loss(q, k, text, image, alignment="congruence", direction="both")
    torch.testing.assert_close(got, want["congruence", "L"] + want["congruence", "V"], rtol=1e-5, atol=1e-7)

    # one word, one region: every matrix is [[1]] and the singular loss is exactly 0
    text1 = torch.tensor([[False, True, False, False, False]])
    image1 = torch.tensor([[False, False, False, False, True]])
    assert ref.reference_loss(q, k, text1, image1, alignment="singular", direction="both").item() == 0.0


# ----------------------------------------------------------------------------------------------
# the library against the reference


def test_relation_matrices_match_reference():
    q, k, text, image = make_batch()
    rel = iais.relation_matrices(q, k, text, image)
    assert_rel_matches(rel, ref.reference_matrices(q, k, text, image), n=N)


@pytest.mark.parametrize("alignment,direction", COMBOS)
def test_loss_matches_reference(alignment, direction):
    q, k, text, image = make_batch()
    rel = iais.relation_matrices(q, k, text, image)
    got_none = iais.iais_loss(rel, alignment=alignment, direction=direction, reduction="none")
    want_none = ref.reference_loss(q, k, text, image, alignment=alignment, direction=direction, reduction="none")
    assert got_none.shape == (B,)
    assert got_none.dtype == torch.float32
    assert torch.isfinite(got_none).all()
    torch.testing.assert_close(got_none, want_none, rtol=1e-5, atol=1e-7)
    for b, ok in enumerate(VALID):
        if not ok:
            assert got_none[b].item() == 0.0
    got_mean = iais.iais_loss(rel, alignment=alignment, direction=direction, reduction="mean")
    want_mean = ref.reference_loss(q, k, text, image, alignment=alignment, direction=direction, reduction="mean")
    assert got_mean.shape == ()
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-5, atol=1e-7)
    # the mean runs over the valid pairs only
    torch.testing.assert_close(got_mean, got_none[torch.tensor(VALID)].mean(), rtol=1e-6, atol=1e-7)


def test_default_reduction_is_mean():
    q, k, text, image = make_batch()
    rel = iais.relation_matrices(q, k, text, image)
    torch.testing.assert_close(iais.iais_loss(rel, alignment="distributed", direction="both"),
                               iais.iais_loss(rel, alignment="distributed", direction="both", reduction="mean"))


def test_no_valid_pair_gives_zero_mean():
    q, k, text, image = make_batch(word_counts=[3, 0, 2], region_counts=[0, 4, 0], n=12)
    q.requires_grad_(True)
    k.requires_grad_(True)
    rel = iais.relation_matrices(q, k, text, image)
    for a, d in COMBOS:
        mean = iais.iais_loss(rel, alignment=a, direction=d, reduction="mean")
        assert mean.shape == () and mean.item() == 0.0
        none = iais.iais_loss(rel, alignment=a, direction=d, reduction="none")
        assert torch.equal(none.detach(), torch.zeros(3))
        if mean.requires_grad:
            gq, gk = torch.autograd.grad(mean, (q, k), allow_unused=True, retain_graph=True)
            for g in (gq, gk):
                assert g is None or (torch.isfinite(g).all() and (g == 0).all())


# ----------------------------------------------------------------------------------------------
# bf16 inputs


@pytest.mark.parametrize("alignment,direction", COMBOS)
def test_bf16_inputs(alignment, direction):
    q, k, text, image = make_batch()
    qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
    rel = iais.relation_matrices(qb, kb, text, image)
    for name in MATRIX_NAMES:
        assert getattr(rel, name).dtype == torch.float32
    got = iais.iais_loss(rel, alignment=alignment, direction=direction, reduction="none")
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    # same bf16 values, upcast: the library must compute in float32
    want_up = ref.reference_loss(qb.float(), kb.float(), text, image, alignment=alignment, direction=direction,
                                 reduction="none")
    torch.testing.assert_close(got, want_up, rtol=1e-5, atol=1e-6)
    # float32 originals: only bf16 input rounding apart
    want_32 = ref.reference_loss(q, k, text, image, alignment=alignment, direction=direction, reduction="none")
    torch.testing.assert_close(got, want_32, rtol=1e-2, atol=1e-4)
    mean = iais.iais_loss(rel, alignment=alignment, direction=direction, reduction="mean")
    assert torch.isfinite(mean)


def test_bf16_relation_matrices():
    q, k, text, image = make_batch()
    qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
    rel = iais.relation_matrices(qb, kb, text, image)
    assert_rel_matches(rel, ref.reference_matrices(qb.float(), kb.float(), text, image), rtol=1e-5, atol=1e-6)
    assert_rel_matches(rel, ref.reference_matrices(q, k, text, image), rtol=1e-2, atol=5e-3)


# ----------------------------------------------------------------------------------------------
# gradients

# B=2, N=7: pair 0 words {1, 3, 5}, regions {2, 6}, padding {4}; pair 1 words {2, 3}, regions {1, 4, 5}
SMALL_TEXT = torch.tensor([[0, 1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
SMALL_IMAGE = torch.tensor([[0, 0, 1, 0, 0, 0, 1], [0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)


def small_qk(dtype=torch.float64, seed=7):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 7, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    k = torch.randn(2, 2, 7, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return q, k


@pytest.mark.parametrize("alignment,direction", COMBOS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_float64(alignment, direction, reduction):
    # singular included: the argmax index is piecewise constant, so the finite differences of a
    # generic point agree with the analytical gradient (the index is detached).
    q, k = small_qk()

    def f(q_, k_):
        return lib_loss(q_, k_, SMALL_TEXT, SMALL_IMAGE, alignment, direction, reduction)

    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_singular_gradients_match_reference(direction, dtype):
    q, k = small_qk(dtype)
    got = torch.autograd.grad(lib_loss(q, k, SMALL_TEXT, SMALL_IMAGE, "singular", direction, "mean"), (q, k))
    want = torch.autograd.grad(ref.reference_loss(q, k, SMALL_TEXT, SMALL_IMAGE, alignment="singular",
                                                  direction=direction, reduction="mean"), (q, k))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert g.abs().max() > 0
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("alignment,direction", COMBOS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.5, 5.0])
def test_gradients_match_reference_on_main_batch(alignment, direction, dtype, scale):
    # scale 5: sharp, yet the reference is still finite. Each dtype against the reference in the same
    # dtype: near one-hot rows make the singular argmax a tie that rounding breaks.
    q, k, text, image = make_batch(dtype=dtype, scale=scale)
    q.requires_grad_(True)
    k.requires_grad_(True)
    got = torch.autograd.grad(lib_loss(q, k, text, image, alignment, direction, "mean"), (q, k))
    want = torch.autograd.grad(ref.reference_loss(q, k, text, image, alignment=alignment, direction=direction),
                               (q, k))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("alignment,direction", COMBOS)
def test_gradient_finite_with_masked_entries(alignment, direction):
    # main batch: padding positions, a pair with no region, a pair with no word, one-word/one-region pairs
    q, k, text, image = make_batch()
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = lib_loss(q, k, text, image, alignment, direction, "mean")
    assert torch.isfinite(loss)
    loss.backward()
    for g in (q.grad, k.grad):
        assert g is not None and torch.isfinite(g).all()
        # positions that are neither word nor region ([CLS], padding) take no part
        neither = ~(text | image)  # [B, N]
        assert (g.permute(0, 2, 1, 3)[neither] == 0).all()
        # pairs without words or without regions contribute nothing
        for b, ok in enumerate(VALID):
            if not ok:
                assert (g[b] == 0).all()
        assert g[torch.tensor(VALID)].abs().sum() > 0


def test_gradient_finite_with_near_one_hot_attention():
    # very peaked attention: masked entries next to entries close to 0 must not produce NaN
    q, k, text, image = make_batch(scale=6.0)
    q.requires_grad_(True)
    k.requires_grad_(True)
    for a in ("distributed", "congruence"):
        for d in ref.DIRECTIONS:
            loss = lib_loss(q, k, text, image, a, d, "mean")
            gq, gk = torch.autograd.grad(loss, (q, k))
            assert torch.isfinite(loss) and torch.isfinite(gq).all() and torch.isfinite(gk).all()


# ----------------------------------------------------------------------------------------------
# sharp attention: the logs are taken in log space (q, k scaled up until rows are near one-hot)

SCALES = (1.5, 5.0, 10.0, 30.0)


def logspace_loss_float64(q, k, text, image, alignment, direction):
    """Per-pair loss [B] in float64 with every log taken in log space (log of a head mean by
    logsumexp, log of a product by logsumexp over the inner index, log(x + 1e-6) by logaddexp):
    a high-precision evaluation of spec section 3, finite at any sharpness. The singular argmax is
    taken on the float32-rounded A: at near one-hot rows it is a tie (e.g. three heads on three
    regions give 1/3 each) that float32 cannot break, so float32 results follow the same choice."""
    q, k = q.double(), k.double()
    h, d = q.shape[1], q.shape[-1]
    per_pair = []
    for b in range(q.shape[0]):
        w, r = torch.nonzero(text[b]).flatten(), torch.nonzero(image[b]).flatten()
        total = torch.zeros((), dtype=torch.float64)
        if w.numel() and r.numel():
            scores = q[b] @ k[b].transpose(-1, -2) / math.sqrt(d)

            def log_a(x, y, scores=scores):
                return torch.log_softmax(scores[:, x][:, :, y], -1).logsumexp(0) - math.log(h)

            def log_mm(la, lb):
                return (la[:, :, None] + lb[None, :, :]).logsumexp(1)

            logs = {"L": (log_a(w, w), log_a(r, r), log_a(w, r), log_a(r, w)),
                    "V": (log_a(r, r), log_a(w, w), log_a(r, w), log_a(w, r))}
            for x in ("L", "V") if direction == "both" else (direction,):
                log_s, log_sy, log_xy, log_yx = logs[x]
                if alignment == "singular":
                    a = log_xy.exp().float().argmax(1)
                    log_p = torch.log_softmax(log_sy.exp()[a][:, a], 1)
                    log_s_eps, log_p_eps = log_s, log_p
                else:
                    log_p = log_mm(log_xy, log_yx) if alignment == "distributed" else \
                        log_mm(log_mm(log_xy, log_sy), log_yx)
                    log_eps = torch.tensor(math.log(ref.EPS), dtype=torch.float64)
                    log_s_eps, log_p_eps = torch.logaddexp(log_s, log_eps), torch.logaddexp(log_p, log_eps)
                kl = log_p.exp() * (log_p - log_s_eps) + log_s.exp() * (log_s - log_p_eps)
                total = total + kl.sum() / log_s.shape[0]
        per_pair.append(total)
    return torch.stack(per_pair)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alignment,direction", COMBOS)
def test_sharp_attention_loss_and_gradients_finite(alignment, direction, scale):
    q, k, text, image = make_batch(scale=scale)
    q.requires_grad_(True)
    k.requires_grad_(True)
    rel = iais.relation_matrices(q, k, text, image)
    none = iais.iais_loss(rel, alignment=alignment, direction=direction, reduction="none")
    mean = iais.iais_loss(rel, alignment=alignment, direction=direction, reduction="mean")
    assert torch.isfinite(none).all() and torch.isfinite(mean)
    # a symmetric KL is >= 0; the soft modes' 1e-6 inside the log allows -2e-6 per direction
    assert (none.detach() >= -1e-5).all()
    gq, gk = torch.autograd.grad(mean, (q, k))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()
    assert gq.abs().sum() > 0
    # float64 in log space: the float32 library keeps its precision however sharp the rows are
    want = logspace_loss_float64(q.detach(), k.detach(), text, image, alignment, direction)
    torch.testing.assert_close(none.detach(), want.float(), rtol=1e-4, atol=1e-6)
    if scale == 1.5:  # normal sharpness: still the reference, to its usual tolerance
        torch.testing.assert_close(none, ref.reference_loss(q, k, text, image, alignment=alignment,
                                                            direction=direction, reduction="none"),
                                   rtol=1e-5, atol=1e-7)


def test_sharp_attention_scale_30_is_past_what_probabilities_can_hold():
    # the case the log space exists for: entries of S_L underflow to exactly 0 while their logs stay
    # finite; even in float64 the reference's plain log(S) is infinite here.
    q, k, text, image = make_batch(scale=30.0)
    rel = iais.relation_matrices(q, k, text, image)
    valid = rel.word_mask[:, :, None] & rel.word_mask[:, None, :]
    assert ((rel.s_l == 0) & valid).any()
    for name in MATRIX_NAMES:
        log_m = rel.log(name)
        assert torch.isfinite(log_m).all()
        assert (log_m <= 1e-6).all()
    assert torch.isinf(ref.reference_loss(q.double(), k.double(), text, image, alignment="singular",
                                          direction="both", reduction="none")).any()


def test_logs_are_the_logs_of_the_matrices():
    q, k, text, image = make_batch()
    rel = iais.relation_matrices(q, k, text, image)
    rel_p = iais.relation_matrices_from_probs(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1), text, image)
    for name, rows, cols in (("s_l", rel.word_mask, rel.word_mask), ("s_v", rel.region_mask, rel.region_mask),
                             ("t2i", rel.word_mask, rel.region_mask), ("i2t", rel.region_mask, rel.word_mask)):
        valid = rows[:, :, None] & cols[:, None, :]
        m, log_m = getattr(rel, name), rel.log(name)
        assert log_m is getattr(rel, f"log_{name}") and log_m.dtype == torch.float32
        torch.testing.assert_close(log_m[valid], m[valid].log(), rtol=1e-5, atol=1e-6)
        assert (log_m[~valid] == 0).all()
        # from materialised probabilities: the clamped log of the matrices, derived on demand
        assert getattr(rel_p, f"log_{name}") is None
        torch.testing.assert_close(rel_p.log(name), log_m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alignment,direction", COMBOS)
def test_gradcheck_float64_sharp(alignment, direction):
    # moderate sharpness (scores a few times larger than test_gradcheck_float64's)
    q, k = small_qk()
    q, k = (3.0 * q).detach().requires_grad_(True), (3.0 * k).detach().requires_grad_(True)

    def f(q_, k_):
        return lib_loss(q_, k_, SMALL_TEXT, SMALL_IMAGE, alignment, direction, "mean")

    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_isd_annotated_and_entropy_finite_at_sharp_attention():
    q, k, text, image = make_batch(scale=30.0)
    rel = iais.relation_matrices(q, k, text, image, per_head=True)
    w2r = make_word_to_region(text, image)
    for d in ref.DIRECTIONS:
        got = iais.isd_annotated(rel, w2r, direction=d)
        assert torch.isfinite(got).all() and (got >= -1e-6).all()
    for name, value in iais.attention_entropy(rel).items():
        ok = ~torch.isnan(value)
        assert ok.any() and (value[ok] >= -1e-6).all() and (value[ok] <= 1 + 1e-6).all(), name


# ----------------------------------------------------------------------------------------------
# relation_matrices_from_probs


@pytest.mark.parametrize("mask_padding", [False, True])
def test_from_probs_equals_relation_matrices(mask_padding):
    q, k, text, image = make_batch()
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if mask_padding:
        key_ok = text | image
        key_ok[:, 0] = True  # [CLS]
        scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    rel_p = iais.relation_matrices_from_probs(probs, text, image, per_head=True)
    rel_q = iais.relation_matrices(q, k, text, image, per_head=True)
    for name in MATRIX_NAMES:
        torch.testing.assert_close(getattr(rel_p, name), getattr(rel_q, name), rtol=1e-5, atol=1e-6)
    for name in ("head_log_s_l", "head_log_s_v"):  # (clamped where a probability underflowed)
        torch.testing.assert_close(getattr(rel_p, name).exp(), getattr(rel_q, name).exp(), rtol=1e-5, atol=1e-6)
    for name in ("word_mask", "region_mask", "word_pos", "region_pos"):
        assert torch.equal(getattr(rel_p, name), getattr(rel_q, name))
    assert_rel_matches(rel_p, ref.reference_matrices(q, k, text, image), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# slot bounds: the batch's largest counts by default (one host read), static when given (the model)


def main_probs(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def test_default_bounds_are_the_largest_counts():
    q, k, text, image = make_batch()
    for rel in (iais.relation_matrices(q, k, text, image), iais.relation_matrices_from_probs(main_probs(q, k), text, image)):
        assert rel.word_mask.shape == (B, max(WORDS)) and rel.region_mask.shape == (B, max(REGIONS))
        assert rel.s_l.shape == (B, max(WORDS), max(WORDS)) and rel.t2i.shape == (B, max(WORDS), max(REGIONS))
    # no region in the whole batch: one masked slot, a loss of 0 and no NaN
    q, k, text, image = make_batch(word_counts=[3, 2], region_counts=[0, 0], n=8)
    rel = iais.relation_matrices(q, k, text, image)
    assert rel.region_mask.shape == (2, 1) and not rel.region_mask.any()
    for a, d in COMBOS:
        assert iais.iais_loss(rel, alignment=a, direction=d).item() == 0.0


@pytest.mark.parametrize("max_words,max_regions", [(9, 8), (12, 10), (N, N), (100, 100)])
def test_static_bounds_match_reference_and_default(max_words, max_regions):
    q, k, text, image = make_batch()
    mats = ref.reference_matrices(q, k, text, image)
    rel = iais.relation_matrices(q, k, text, image, max_words=max_words, max_regions=max_regions)
    assert rel.word_mask.shape[1] == min(max_words, N) and rel.region_mask.shape[1] == min(max_regions, N)
    assert_rel_matches(rel, mats, n=N)
    rel_p = iais.relation_matrices_from_probs(main_probs(q, k), text, image, max_words=max_words,
                                              max_regions=max_regions)
    assert rel_p.word_mask.shape == rel.word_mask.shape and rel_p.region_mask.shape == rel.region_mask.shape
    assert_rel_matches(rel_p, mats, rtol=1e-5, atol=1e-6, n=N)
    default = iais.relation_matrices(q, k, text, image)
    for a, d in COMBOS:  # padding slots change nothing
        torch.testing.assert_close(iais.iais_loss(rel, alignment=a, direction=d, reduction="none"),
                                   iais.iais_loss(default, alignment=a, direction=d, reduction="none"),
                                   rtol=1e-6, atol=1e-7)


def test_static_bound_below_a_count_is_an_error():
    q, k, text, image = make_batch()
    with pytest.raises(RuntimeError, match="more valid words than max_words=8"):
        iais.relation_matrices(q, k, text, image, max_words=max(WORDS) - 1)
    with pytest.raises(RuntimeError, match="more valid regions than max_regions=7"):
        iais.relation_matrices_from_probs(main_probs(q, k), text, image, max_regions=max(REGIONS) - 1)
    with pytest.raises(ValueError, match="at least 1"):
        iais.relation_matrices(q, k, text, image, max_words=0)


# ----------------------------------------------------------------------------------------------
# ISD and ISDa


@pytest.mark.parametrize("alignment,direction", COMBOS)
def test_isd_equals_loss_without_grad(alignment, direction):
    q, k, text, image = make_batch()
    q.requires_grad_(True)
    k.requires_grad_(True)
    rel = iais.relation_matrices(q, k, text, image)
    got = iais.isd(rel, alignment=alignment, direction=direction)
    assert got.shape == (B,)
    assert got.grad_fn is None and not got.requires_grad
    loss = iais.iais_loss(rel, alignment=alignment, direction=direction, reduction="none")
    torch.testing.assert_close(got, loss.detach(), rtol=1e-6, atol=1e-8)
    want = ref.reference_isd(q, k, text, image, alignment=alignment, direction=direction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# (word slot -> region slot) annotations of the main batch, by pair; pair 4 (valid) has none.
# Pair 0: regions in sequence order are slots 0, 2, 3 while their first words are slots 1, 0, 2, and
# region slot 0 is pointed to by two words (b(r) = the lower position); words 3 and 5 are unannotated.
ANNOTATIONS = {0: {0: 2, 1: 0, 2: 3, 4: 0}, 1: {0: 1}, 2: {1: 0, 4: 0}, 6: {1: 1, 3: 0, 5: 4, 6: 1}}


def make_word_to_region(text, image):
    w2r = torch.full(text.shape, -1, dtype=torch.long)
    for b, ann in ANNOTATIONS.items():
        words = torch.nonzero(text[b]).flatten()
        regions = torch.nonzero(image[b]).flatten()
        for t, v in ann.items():
            w2r[b, words[t]] = regions[v]
    return w2r


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_isd_annotated_matches_reference(direction):
    q, k, text, image = make_batch()
    w2r = make_word_to_region(text, image)
    rel = iais.relation_matrices(q, k, text, image, per_head=True)
    got = iais.isd_annotated(rel, w2r, direction=direction)
    want = ref.reference_isd_annotated(q, k, text, image, w2r, direction=direction)
    assert got.shape == (B,)
    assert not got.requires_grad
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got[4].item() == 0.0  # valid pair, no annotated word
    for b, ok in enumerate(VALID):
        if not ok:
            assert got[b].item() == 0.0
    assert (got[torch.tensor([0, 6])] > 1e-4).all()


def test_isd_annotated_ignores_values_at_non_word_positions():
    q, k, text, image = make_batch()
    w2r = make_word_to_region(text, image)
    stray = w2r.clone()
    neither = ~text
    region0 = torch.nonzero(image[0]).flatten()[1]
    stray[0][neither[0]] = region0  # annotations only count at word positions
    rel = iais.relation_matrices(q, k, text, image, per_head=True)
    for d in ref.DIRECTIONS:
        torch.testing.assert_close(iais.isd_annotated(rel, stray, direction=d),
                                   iais.isd_annotated(rel, w2r, direction=d), rtol=0, atol=0)


def test_isd_annotated_v_uses_lowest_position_word():
    # pair 0, direction V by hand: regions (sequence order) slots 0, 2, 3 <- first words 1, 0, 2
    q, k, text, image = make_batch()
    (m,) = ref.reference_matrices(q[:1], k[:1], text[:1], image[:1])
    rp = torch.tensor([0, 2, 3])
    bw = torch.tensor([1, 0, 2])
    s = ref._block(m.q, m.k, m.region_pos[rp], m.region_pos[rp])  # restricted per head, then the mean
    p = torch.softmax(m.s_l[bw][:, bw], dim=1)
    want = ((p * (p / s).log()).sum() + (s * (s / p).log()).sum()) / 3
    rel = iais.relation_matrices(q, k, text, image, per_head=True)
    got = iais.isd_annotated(rel, make_word_to_region(text, image), direction="V")
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-7)


def test_isd_annotated_all_words_annotated_one_to_one_is_singular_like():
    # with every word annotated to a distinct region, the L part uses exactly the word rows of S_L
    q, k, text, image = make_batch(word_counts=[3, 4], region_counts=[5, 6], n=16, seed=3)
    w2r = torch.full(text.shape, -1, dtype=torch.long)
    for b in range(2):
        words = torch.nonzero(text[b]).flatten()
        regions = torch.nonzero(image[b]).flatten()
        w2r[b, words] = regions[torch.randperm(regions.numel(), generator=torch.Generator().manual_seed(b))
                                [:words.numel()]]
    rel = iais.relation_matrices(q, k, text, image, per_head=True)
    for d in ref.DIRECTIONS:
        torch.testing.assert_close(iais.isd_annotated(rel, w2r, direction=d),
                                   ref.reference_isd_annotated(q, k, text, image, w2r, direction=d),
                                   rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# batching hygiene


def big_batch(seed=11):
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 14, (64,), generator=g).tolist()
    regions = torch.randint(0, 10, (64,), generator=g).tolist()
    return make_batch(word_counts=words, region_counts=regions, n=26, h=2, d=8, seed=seed)


def test_batch_of_64_in_one_call():
    q, k, text, image = big_batch()
    rel = iais.relation_matrices(q, k, text, image)
    assert rel.s_l.shape[0] == 64
    for a, d in (("singular", "both"), ("distributed", "both"), ("congruence", "both")):
        got = iais.iais_loss(rel, alignment=a, direction=d, reduction="none")
        assert got.shape == (64,) and torch.isfinite(got).all()
        want = ref.reference_loss(q, k, text, image, alignment=a, direction=d, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_results_permute_with_the_batch():
    q, k, text, image = big_batch()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    rel = iais.relation_matrices(q, k, text, image)
    rel_p = iais.relation_matrices(q[perm], k[perm], text[perm], image[perm])
    for name in MATRIX_NAMES + ("word_mask", "region_mask", "word_pos", "region_pos"):
        torch.testing.assert_close(getattr(rel_p, name), getattr(rel, name)[perm], rtol=1e-6, atol=1e-8)
    for a, d in COMBOS:
        torch.testing.assert_close(iais.iais_loss(rel_p, alignment=a, direction=d, reduction="none"),
                                   iais.iais_loss(rel, alignment=a, direction=d, reduction="none")[perm],
                                   rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(iais.iais_loss(rel_p, alignment=a, direction=d),
                                   iais.iais_loss(rel, alignment=a, direction=d), rtol=1e-5, atol=1e-7)


def test_pair_result_does_not_depend_on_other_pairs():
    q, k, text, image = big_batch()
    rel = iais.relation_matrices(q, k, text, image)
    full = {(a, d): iais.iais_loss(rel, alignment=a, direction=d, reduction="none") for a, d in COMBOS}
    for b in range(0, 64, 9):
        sl = slice(b, b + 1)
        rel_b = iais.relation_matrices(q[sl], k[sl], text[sl], image[sl])
        for a, d in COMBOS:
            got = iais.iais_loss(rel_b, alignment=a, direction=d, reduction="none")
            torch.testing.assert_close(got, full[a, d][sl], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# values computed by hand (spec sections 4 and 7), not through the reference's reading


def hand_relations(s_l, s_v, t2i, i2t, word_pos, region_pos, heads_s_l=None, heads_s_v=None) -> iais.RelationMatrices:
    """One pair's RelationMatrices from explicit (already cropped, valid) matrices; with ``heads_s_l``
    and ``heads_s_v`` ([H][rows][cols] per head) S_L and S_V are their head means and the per-head
    logs are kept (what ISDa restricts)."""
    t, v = len(word_pos), len(region_pos)
    f = lambda x: torch.tensor(x, dtype=torch.float32)[None]  # noqa: E731
    heads = {}
    if heads_s_l is not None:
        s_l, s_v = f(heads_s_l).mean(1)[0].tolist(), f(heads_s_v).mean(1)[0].tolist()
        heads = {"head_log_s_l": f(heads_s_l).log(), "head_log_s_v": f(heads_s_v).log()}
    return iais.RelationMatrices(
        s_l=f(s_l), s_v=f(s_v), t2i=f(t2i), i2t=f(i2t), word_mask=torch.ones(1, t, dtype=torch.bool),
        region_mask=torch.ones(1, v, dtype=torch.bool), word_pos=torch.tensor([word_pos]),
        region_pos=torch.tensor([region_pos]), **heads,
    )


def test_entropy_is_one_for_uniform_rows_and_zero_for_one_hot_rows():
    third, half = [1 / 3] * 3, [0.5, 0.5]
    uniform = hand_relations([third] * 3, [half] * 2, [half] * 3, [third] * 2, [1, 2, 3], [5, 6])
    one_hot = hand_relations([[0, 1, 0], [0, 0, 1], [1, 0, 0]], [[1, 0], [0, 1]], [[0, 1]] * 3,
                             [[1, 0, 0], [0, 0, 1]], [1, 2, 3], [5, 6])
    for name, value in iais.attention_entropy(uniform).items():
        assert value.item() == pytest.approx(1.0, abs=1e-6), name
    for name, value in iais.attention_entropy(one_hot).items():
        assert value.item() == pytest.approx(0.0, abs=1e-6), name
    # Mixed rows average: S_L rows uniform / one-hot / half-half-zero (log 2 / log 3).
    mixed = hand_relations([third, [0, 1, 0], [0.5, 0.5, 0]], [half] * 2, [half] * 3, [third] * 2, [1, 2, 3], [5, 6])
    assert iais.attention_entropy(mixed)["S_L"].item() == pytest.approx((1 + 0 + math.log(2) / math.log(3)) / 3,
                                                                       rel=1e-6)


def test_entropy_leaves_out_matrices_whose_rows_have_one_valid_column():
    """One region: S_V and A_t2i rows have a single column (no entropy defined); S_L and A_i2t do."""
    rel = hand_relations([[0.5, 0.5], [1, 0]], [[1.0]], [[1.0], [1.0]], [[0.5, 0.5]], [1, 2], [4])
    h = iais.attention_entropy(rel)
    assert torch.isnan(h["S_V"]).all() and torch.isnan(h["A_t2i"]).all()
    assert h["S_L"].item() == pytest.approx(0.5, abs=1e-6) and h["A_i2t"].item() == pytest.approx(1.0, abs=1e-6)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _softmax(x: list[float]) -> list[float]:
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def _renorm(x: list[float]) -> list[float]:
    return [v / sum(x) for v in x]


def test_isda_by_hand_from_the_spec_text():
    """Spec section 4: a(i) from the annotations, not from A_t2i; unannotated words leave the rows;
    S_X restricted to the kept rows per head, as section 1 restricts every matrix, then averaged.

    Words at sequence positions 1, 2, 3; regions at 5, 6; two heads. Word 1 is annotated with the
    region at 6, word 3 with the region at 5, word 2 with nothing. A_t2i points every word at region
    5 (it must not matter)."""
    heads_s_l = [[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.3, 0.6]],
                 [[0.1, 0.1, 0.8], [0.4, 0.4, 0.2], [0.5, 0.3, 0.2]]]
    heads_s_v = [[[0.7, 0.3], [0.2, 0.8]], [[0.5, 0.5], [0.6, 0.4]]]
    s_l = [[(a + b) / 2 for a, b in zip(r0, r1)] for r0, r1 in zip(*heads_s_l)]  # the head means
    s_v = [[(a + b) / 2 for a, b in zip(r0, r1)] for r0, r1 in zip(*heads_s_v)]
    rel = hand_relations(None, None, [[0.9, 0.1]] * 3, [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], [1, 2, 3], [5, 6],
                         heads_s_l=heads_s_l, heads_s_v=heads_s_v)
    w2r = torch.full((1, 8), -1)
    w2r[0, 1], w2r[0, 3] = 6, 5
    # L: rows and columns = annotated words {w1, w3}; a(w1) = r(6) = slot 1, a(w3) = r(5) = slot 0.
    # Each head renormalised over {w1, w3}, then the mean: row w1 = mean(0.5/0.7, 0.1/0.9), ...
    s = [[sum(_renorm([h[i][0], h[i][2]])[j] for h in heads_s_l) / 2 for j in (0, 1)] for i in (0, 2)]
    assert s[0] == pytest.approx([(0.5 / 0.7 + 0.1 / 0.9) / 2, (0.2 / 0.7 + 0.8 / 0.9) / 2])
    p = [_softmax([s_v[1][1], s_v[1][0]]), _softmax([s_v[0][1], s_v[0][0]])]
    want_l = sum(_kl(pi, si) + _kl(si, pi) for pi, si in zip(p, s)) / 2
    # The other order (average the heads, then renormalise) gives another value: the convention matters.
    averaged_first = [_renorm([s_l[0][0], s_l[0][2]]), _renorm([s_l[2][0], s_l[2][2]])]
    other = sum(_kl(pi, si) + _kl(si, pi) for pi, si in zip(p, averaged_first)) / 2
    assert abs(other - want_l) > 0.01
    # V: rows = regions an annotated word points to {r(5), r(6)}: all regions, so S_V is kept whole;
    # b(r5) = w3 (slot 2), b(r6) = w1 (slot 0); P_V from the head-mean S_L.
    s = [s_v[0], s_v[1]]
    p = [_softmax([s_l[2][2], s_l[2][0]]), _softmax([s_l[0][2], s_l[0][0]])]
    want_v = sum(_kl(pi, si) + _kl(si, pi) for pi, si in zip(p, s)) / 2
    assert want_l > 0.01 and want_v > 0.01
    assert iais.isd_annotated(rel, w2r, direction="L").item() == pytest.approx(want_l, rel=1e-5)
    assert iais.isd_annotated(rel, w2r, direction="V").item() == pytest.approx(want_v, rel=1e-5)
    assert iais.isd_annotated(rel, w2r, direction="both").item() == pytest.approx(want_l + want_v, rel=1e-5)
    with pytest.raises(ValueError, match="per head"):
        iais.isd_annotated(hand_relations(s_l, s_v, [[0.9, 0.1]] * 3, [[0.2, 0.3, 0.5]] * 2, [1, 2, 3], [5, 6]),
                           w2r, direction="L")
    # Without any annotation the pair has no ISDa rows: 0, whatever the matrices.
    assert iais.isd_annotated(rel, torch.full((1, 8), -1), direction="both").item() == 0.0
