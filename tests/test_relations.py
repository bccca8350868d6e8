"""The relation benchmark: generator (swap pairs differ only in the relation, captions true only of their
image, relation spans), the relation-word MLM probe, the entropy guard's math, and a smoke run of
benchmarks/relations.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from iais_scale import evaluate as ev, iais, objectives as ob
from iais_scale.config import ConfigError, load_config
from iais_scale.data import relations as rl, scenes as sc
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import RegionFields
from iais_scale.data.retrieval import read_split, swap_groups

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_train_pairs=40, n_val=6, n_test=80, n_swap_groups=40, shard_size=50)
_CAPTION = re.compile(r"a (\w+ \w+ \w+) (left of|right of|above|below) a (\w+ \w+ \w+)")
_PLACEMENT = re.compile(r"a (\w+ \w+ \w+) (?:on the|at the) (left|right|top|bottom)")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return rl.make_relations(tmp_path_factory.mktemp("relations") / "rel", seed=3, **SMALL)


def parse(caption: str) -> sc.Triple:
    m = _CAPTION.fullmatch(caption)
    assert m, caption
    return m.group(1), m.group(2), m.group(3)


def objects(sample) -> dict[str, tuple[int, int]]:
    """The objects of a stored image, {phrase: (row, col)}, decoded from its regions as a reader would:
    rows whose features are one-hot colour/shape/size (within the 0.1 noise) and whose box is the
    square of that size; distractors (pure-noise features, random boxes) fail the test."""
    nc, ns = len(rl.COLOURS), len(rl.SHAPES)
    out = {}
    for feat, box in zip(sample.features, sample.boxes, strict=True):
        blocks = feat[:nc], feat[nc : nc + ns], feat[nc + ns :]
        if not all((b > 0.5).sum() == 1 and (b < 0.5).sum() == len(b) - 1 for b in blocks):
            continue
        colour, shape, size = (int(b.argmax()) for b in blocks)
        side = sc.SIZES[sc.SIZE_NAMES[size]]
        if not (box[2] - box[0] == side and box[3] - box[1] == side):
            continue
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        row, col = int(cy // (sc.IMAGE_SIZE / sc.GRID)), int(cx // (sc.IMAGE_SIZE / sc.GRID))
        phrase = f"{sc.SIZE_NAMES[size]} {list(rl.COLOURS)[colour]} {rl.SHAPES[shape]}"
        assert phrase not in out, "two objects with one phrase"
        out[phrase] = (row, col)
    return out


def truth(sample) -> set[sc.Triple]:
    objs = {p: sc.Obj("", "", "small", r, c, 0, 0) for p, (r, c) in objects(sample).items()}
    return {(a, rel, b) for a, oa in objs.items() for b, ob_ in objs.items() if a != b
            for rel in sc.relations_between(oa, ob_)}


def place_of(cell: tuple[int, int], place: str) -> bool:
    """Whether "on the left" (etc.) is true of an object in grid cell (row, col)."""
    row, col = cell
    return {"left": col == 0, "right": col == sc.GRID - 1, "top": row == 0, "bottom": row == sc.GRID - 1}[place]


def check_spans(sample) -> None:
    spans = sample.meta["relation_spans"]
    assert len(spans) == len(sample.captions)
    for text, (a, b) in zip(sample.captions, spans, strict=True):
        m = _PLACEMENT.fullmatch(text)
        assert text[a:b] == (m.group(2) if m else parse(text)[1])


# --------------------------------------------------------------------------- generator


def test_layout_manifest_and_verify(data: Path) -> None:
    from data_tools.verify import verify

    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["generator"] == "relations" and manifest["feature_dim"] == rl.FEATURE_DIM == 16
    assert manifest["splits"] == {"train": 80, "val": 6, "test": 80, "swap": 80}
    assert not verify(data)  # the number of problems
    # Idempotent with the same parameters; other parameters need overwrite.
    assert rl.make_relations(data, seed=3, **SMALL) == data
    with pytest.raises(FileExistsError):
        rl.make_relations(data, seed=4, **SMALL)


def test_objects_sit_in_their_cells_so_boxes_give_the_relation() -> None:
    rng = np.random.default_rng(0)
    cell = sc.IMAGE_SIZE / sc.GRID

    def column(o: sc.Obj) -> int:  # from the box alone
        return int((o.box[0] + o.box[2]) / 2 // cell)

    def row(o: sc.Obj) -> int:
        return int((o.box[1] + o.box[3]) / 2 // cell)

    for _ in range(300):
        scene = sc.sample_scene(rng, rl.PALETTE)
        for a in scene:
            x1, y1, x2, y2 = a.box
            assert sc.EDGES[a.col] < x1 and x2 < sc.EDGES[a.col + 1]
            assert sc.EDGES[a.row] < y1 and y2 < sc.EDGES[a.row + 1]
            assert (row(a), column(a)) == (a.row, a.col)
            for b in scene:
                if a is not b:  # every relation follows from the two boxes
                    rels = sc.relations_between(a, b)
                    assert ("left of" in rels) == (column(a) < column(b))
                    assert ("right of" in rels) == (column(a) > column(b))
                    assert ("above" in rels) == (row(a) < row(b))
                    assert ("below" in rels) == (row(a) > row(b))


def test_swap_groups_differ_only_in_the_relation(data: Path) -> None:
    groups = swap_groups(read_split(data / "swap"))
    kinds = set()
    for g in groups:
        (im0, im1), (c0, c1) = g.images, g.captions
        kind = im0.meta["swap_kind"]
        kinds.add(kind)
        s0, r0, o0 = parse(c0)
        s1, r1, o1 = parse(c1)
        if kind == "argument":  # same words, the two objects trade places
            assert (s1, r1, o1) == (o0, r0, s0)
        else:  # same objects in the same order, the opposite relation word
            assert (s1, o1) == (s0, o0) and r1 == sc.OPPOSITE[r0]
        # Same region features (as multisets: the order is shuffled); only the two named objects moved.
        assert np.array_equal(np.sort(im0.features, 0), np.sort(im1.features, 0))
        a, b = objects(im0), objects(im1)
        assert a.keys() == b.keys()
        moved = {p for p in a if a[p] != b[p]}
        assert moved == {s0, o0} and a[s0] == b[o0] and a[o0] == b[s0]
        # Each caption is true of its own image only.
        t0, t1 = truth(im0), truth(im1)
        assert parse(c0) in t0 and parse(c0) not in t1
        assert parse(c1) in t1 and parse(c1) not in t0
        check_spans(im0), check_spans(im1)
    assert kinds == {"argument", "relation"}


def test_training_pairs_carry_decisive_captions(data: Path) -> None:
    train = read_split(data / "train")
    by_group: dict[int, dict[int, object]] = {}
    for s in train:
        by_group.setdefault(s.meta["pair"]["group"], {})[s.meta["pair"]["index"]] = s
    assert len(by_group) == SMALL["n_train_pairs"]
    for pair in by_group.values():
        im0, im1 = pair[0], pair[1]
        a, b = objects(im0), objects(im1)
        assert a.keys() == b.keys() and len([p for p in a if a[p] != b[p]]) == 2
        t0, t1 = truth(im0), truth(im1)
        for im, own, other, here, there in ((im0, t0, t1, a, b), (im1, t1, t0, b, a)):
            relational, placement = im.captions[:2], im.captions[2:]
            assert len(set(relational)) == 2 and len(placement) == 1  # X or Y always has a decisive placement
            for c in relational:  # true of the image, false of its partner
                assert parse(c) in own and parse(c) not in other
            m = _PLACEMENT.fullmatch(placement[0])
            assert m, placement[0]
            phrase, place = m.group(1), m.group(2)
            assert phrase in {p for p in a if a[p] != b[p]}  # about one of the two objects that moved
            assert place_of(here[phrase], place) and not place_of(there[phrase], place)
            check_spans(im)


def test_retrieval_captions_are_true_of_their_image_only(data: Path) -> None:
    test = read_split(data / "test")
    facts = [truth(s) for s in test]
    for i, s in enumerate(test):
        check_spans(s)
        for c in s.captions:
            holds = [j for j, f in enumerate(facts) if parse(c) in f]
            assert holds == [i]


def test_generator_is_deterministic(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
        return h.hexdigest()

    small = dict(SMALL, n_train_pairs=5, n_test=5, n_swap_groups=5)
    a = rl.make_relations(tmp_path / "a", seed=7, **small)
    b = rl.make_relations(tmp_path / "b", seed=7, **small)
    assert digest(a) == digest(b)


def test_data_tools_relations_command(tmp_path: Path, capsys) -> None:
    from data_tools.__main__ import main

    assert main(["relations", "--out", str(tmp_path / "r"), "--n-train-pairs", "3", "--n-val", "2", "--n-test", "4",
                 "--n-swap-groups", "2", "--seed", "1"]) == 0
    assert "train 6, val 2, test 4, swap 4" in capsys.readouterr().out


# --------------------------------------------------------------------------- relation-word MLM probe


def test_relation_token_mask_marks_the_relation_pieces(data: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    collator = Collator(tok, 24, RegionFields(8))
    captions = ["a small red circle left of a large blue square", "a large blue square above a small red circle"]
    spans = [[19, 26], [20, 25], None][:2]
    texts, mask = ev.relation_token_mask(collator, captions + ["a small red circle below a large blue square"],
                                         spans + [None])
    marked = [tok.convert_ids_to_tokens(texts["text_ids"][r][mask[r]].tolist()) for r in range(3)]
    assert marked == [["left", "of"], ["above"], []]
    # A span that is not [start, end] inside the caption marks nothing.
    _, bad = ev.relation_token_mask(collator, captions, [[19, 99], "left of"])
    assert not bad.any()


def test_masked_prediction_hits_by_hand() -> None:
    labels = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    predicted = torch.tensor([[1, 5, 3, 2], [1, 7, 2, 0], [4, 4, 4, 4]])
    logits = torch.nn.functional.one_hot(predicted, 10).float()
    hits = ev.masked_prediction_hits(logits, labels, mask)
    assert hits.tolist() == [[0, 2, 1], [1, 1, 1], [0, 0, 0]]


class _ScriptedMLM(torch.nn.Module):
    """Predicts, for caption r (its index stored in region feature [0, 0]), the ids ``answers[r]``."""

    def __init__(self, answers: torch.Tensor, vocab: int):
        super().__init__()
        self.answers, self.vocab = answers, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, text_ids, text_attention, region_features, region_geometry, region_attention):
        rows = region_features[:, 0, 0].long()
        return SimpleNamespace(predicted=self.answers[rows, : text_ids.shape[1]])

    def mlm_logits(self, out, n_text):
        return torch.nn.functional.one_hot(out.predicted, self.vocab).float()


def test_relation_probe_on_a_hand_made_case(data: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    collator = Collator(tok, 24, RegionFields(8))
    captions = ["a small red circle left of a large blue square", "a large blue square above a small red circle",
                "a large blue square below a small red circle", "a small red circle right of a large blue square",
                "a small red circle right of a large blue square"]
    spans = [[19, 26], [20, 25], [20, 25], [19, 27], None]  # the last caption marks no relation
    ids = collator.texts(captions)["text_ids"]
    answers = ids.clone()
    vocab = tok.get_vocab()

    def put(row: int, words: list[str]) -> None:
        start = (ids[row] == vocab[captions[row].split()[4]]).nonzero()[0, 0]
        answers[row, start : start + len(words)] = torch.tensor([vocab[w] for w in words])

    put(1, ["below"])  # wrong
    put(3, ["left", "of"])  # "left" wrong, "of" right
    n = len(captions)
    images = {"region_features": torch.arange(n, dtype=torch.float)[:, None, None].expand(n, 1, 16).contiguous(),
              "region_geometry": torch.zeros(n, 1, 7), "region_attention": torch.ones(n, 1, dtype=torch.bool)}
    probe = ev.relation_probe(_ScriptedMLM(answers, len(tok)), collator, captions, spans, images, batch_size=2)
    # Captions 0 and 2 right, 1 and 3 wrong: 2 of 4; word pieces: 2 + 0 + 1 + 1 of 2 + 1 + 1 + 2.
    assert probe == {"captions": 4, "accuracy": 50.0, "token_accuracy": pytest.approx(100 * 4 / 6)}
    assert ev.relation_probe(_ScriptedMLM(answers, len(tok)), collator, captions, [None] * n, images, 2) is None


def test_evaluate_reports_the_probe_and_the_degenerate_flag(data: Path) -> None:
    from iais_scale.data.retrieval import RetrievalSet
    from iais_scale.model import CrossModalConfig, CrossModalModel

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    collator = Collator(tok, 24, RegionFields(8))
    torch.manual_seed(0)
    model = CrossModalModel(CrossModalConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        region_feature_dim=16, iais_layers=[-1], cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id))
    rset = RetrievalSet.from_samples(read_split(data / "test", limit=10))
    swaps = swap_groups(read_split(data / "swap"))[:5]
    report = ev.evaluate(model, ev.EvalData(collator, rset, swaps), batch_size=64, isd_alignments=["singular"])
    # Swapped arguments and swapped relations scored apart; together they are the overall score.
    kinds = [g.images[0].meta["swap_kind"] for g in swaps]
    by_kind = report["relation_swap"]["by_kind"]
    assert set(by_kind) == set(kinds) and set(kinds) <= {"argument", "relation"}
    for key in ("text", "image", "group"):
        assert sum(by_kind[k][key] * kinds.count(k) for k in by_kind) / len(kinds) == pytest.approx(
            report["relation_swap"][key])
    assert report["relation_mlm"]["captions"] == 10 and report["relation_mlm_swap"]["captions"] == 10
    for probe in (report["relation_mlm"], report["relation_mlm_swap"]):  # hits out of 10 captions
        assert probe["accuracy"] / 10 == pytest.approx(round(probe["accuracy"] / 10), abs=1e-9), probe
    assert report["degenerate"] is True and report["degenerate_layers"] == [1]  # a fresh model: uniform attention
    md = ev.markdown_table(report)
    assert "Relation-word MLM probe (10 relation-swap captions" in md and "WARNING" in md
    off = ev.evaluate(model, ev.EvalData(collator, rset, swaps), batch_size=64, isd_alignments=["singular"],
                      relation_probe_enabled=False)
    assert "relation_mlm" not in off and "relation_mlm_swap" not in off


# --------------------------------------------------------------------------- entropy guard


def _relations(q: torch.Tensor, k: torch.Tensor, n_words: int, n_regions: int) -> iais.RelationMatrices:
    b, _, n, _ = q.shape
    text = torch.zeros(b, n, dtype=torch.bool)
    image = torch.zeros(b, n, dtype=torch.bool)
    text[:, 1 : 1 + n_words] = True
    image[:, n - n_regions :] = True
    return iais.relation_matrices(q, k, text, image)


def test_entropy_guard_math() -> None:
    # q = k = 0: every row uniform, normalised entropy 1 in all four matrices: excess 1 - ceiling.
    zeros = torch.zeros(2, 2, 9, 4)
    flat = _relations(zeros, zeros, 4, 3)
    assert torch.allclose(ob.entropy_excess(flat, 0.8), torch.full((2,), 0.2))
    assert torch.allclose(ob.entropy_excess(flat, 0.999), torch.full((2,), 0.001), atol=1e-6)
    # Sharp attention (every row entropy below the ceiling) costs nothing.
    torch.manual_seed(0)
    q, k = 10 * torch.randn(2, 2, 9, 4), 10 * torch.randn(2, 2, 9, 4)
    sharp = _relations(q, k, 4, 3)
    assert max(v.max() for v in iais.attention_entropy(sharp).values()) < 0.65  # 0.631 (A_t2i)
    assert ob.entropy_excess(sharp, 0.65).tolist() == [0.0, 0.0]
    # Against iais.attention_entropy: the guard is the mean over the four of relu(H - c).
    q, k = torch.randn(3, 2, 9, 4), torch.randn(3, 2, 9, 4)
    rel = _relations(q, k, 4, 3)
    h = iais.attention_entropy(rel)
    expected = sum(torch.relu(h[n] - 0.6) for n in ev.ENTROPY_NAMES) / 4
    assert torch.allclose(ob.entropy_excess(rel, 0.6), expected, atol=1e-6)
    # A pair without regions contributes nothing (and no NaN).
    text = torch.zeros(1, 9, dtype=torch.bool)
    text[0, 1:5] = True
    none = iais.relation_matrices(q[:1], k[:1], text, torch.zeros(1, 9, dtype=torch.bool))
    assert ob.entropy_excess(none, 0.1).tolist() == [0.0]


def test_entropy_guard_gradient_sharpens_attention() -> None:
    # Attention above the ceiling (entropies 0.83-0.96): a gradient step on the guard sharpens it.
    torch.manual_seed(0)
    q = torch.randn(2, 2, 9, 4).requires_grad_()
    k = torch.randn(2, 2, 9, 4)
    guard = ob.entropy_excess(_relations(q, k, 4, 3), 0.5).mean()
    guard.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad():
        after = ob.entropy_excess(_relations(q - 10.0 * q.grad, k, 4, 3), 0.5).mean()
    assert after < guard - 0.003  # 0.0037
    # Exactly uniform attention is a stationary point of the entropy: no gradient there (the guard is a
    # barrier against drifting to the degenerate minimum, not a way out of an exactly uniform start).
    z = torch.zeros(1, 1, 9, 4, requires_grad=True)
    ob.entropy_excess(_relations(z, z, 4, 3), 0.5).sum().backward()
    assert z.grad.abs().max() < 1e-6


def test_entropy_guard_config_is_validated() -> None:
    base = ["objectives.iais.entropy_ceiling=0.9"]
    cfg = load_config(ROOT / "configs/demo.yaml", base + ["objectives.iais.entropy_guard_weight=2.0"])
    assert cfg.objectives.iais.entropy_ceiling == 0.9 and cfg.objectives.iais.entropy_guard_weight == 2.0
    assert load_config(ROOT / "configs/demo.yaml", []).objectives.iais.entropy_ceiling is None  # off by default
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", ["objectives.iais.entropy_ceiling=1.5",
                                                 "objectives.iais.entropy_guard_weight=-1"])
    assert "entropy_ceiling" in str(e.value) and "entropy_guard_weight" in str(e.value)


def test_training_loss_adds_the_guard_under_the_iais_weight(data: Path) -> None:
    from iais_scale.model import CrossModalConfig, CrossModalModel

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    samples = read_split(data / "train")[:8]
    batch = Collator(tok, 24, RegionFields(8)).pairs([(s, s.captions[0]) for s in samples])
    batch.pop("keys")
    torch.manual_seed(0)
    model = CrossModalModel(CrossModalConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        region_feature_dim=16, iais_layers=[-1], cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    def loss(*overrides: str):
        cfg = load_config(ROOT / "configs/demo.yaml", ["objectives.mlm_weight=0", "objectives.mlm_only_steps=0",
                                                        "objectives.num_candidates=4", "objectives.iais.schedule=constant",
                                                        "objectives.iais.weight=0.5", *overrides])
        return ob.training_loss(model, batch, cfg.objectives, step=0, total_steps=10, mask_id=tok.mask_token_id,
                                generator=torch.Generator().manual_seed(0))

    plain, parts = loss()
    guarded, gparts = loss("objectives.iais.entropy_ceiling=0.3", "objectives.iais.entropy_guard_weight=2.0")
    assert "entropy_guard" not in parts and float(gparts["entropy_guard"]) > 0  # a fresh model is near uniform
    assert float(guarded.detach() - plain.detach()) == pytest.approx(0.5 * 2.0 * float(gparts["entropy_guard"]), rel=1e-5)
    off, oparts = loss("objectives.iais.enabled=false", "objectives.iais.entropy_ceiling=0.3")
    assert "entropy_guard" not in oparts  # the guard belongs to IAIS: off with it


# --------------------------------------------------------------------------- benchmark smoke run


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("relations_benchmark", ROOT / "benchmarks" / "relations.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["relations_benchmark"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    results = bench.main([
        "--data", str(tmp_path / "data"), "--out", str(out), "--seeds", "2", "--configs", "baseline,paper,paper+guard",
        "--pretrain-steps", "3", "--pretrain-mlm-steps", "1", "--ground-steps", "2", "--steps", "2", "--batch", "8", "--train-pairs", "24", "--test-images", "12",
        "--swap-groups", "10", "--retrieval-images", "12", "--workers", "1",
    ])
    data = json.loads((out / "relations.json").read_text())
    assert [c["name"] for c in data["configs"]] == ["baseline", "paper", "paper+guard"]
    for c in data["configs"]:
        assert len(c["runs"]) == 2
        for key in ("group", "text", "image", "tr_r1", "ir_r1"):
            s = c["summary"][key]
            assert math.isfinite(s["mean"]) and s["n"] == 2 and s["low"] <= s["mean"] <= s["high"]
        assert all("degenerate" in r for r in c["runs"])
    assert (out / "relations.md").read_text().count("| baseline |") == 2  # the main table and the last-layer one
    assert (out / "relations.png").stat().st_size > 1000
    assert results["configs"][0]["name"] == "baseline"
