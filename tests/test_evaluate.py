"""Evaluation end to end on the tiny demo: relation report and the degenerate-attention warning,
ITC top-k re-ranking, the evaluate launcher on HF and DeepSpeed checkpoints, 1 vs 2 ranks, pictures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, evaluate_launcher as launcher, finish, free_port, one_rank, train
from transformers import AutoTokenizer

from iais_scale import evaluate as ev, iais, viz
from iais_scale.checkpoint import load_model
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import RegionFields
from iais_scale.data.retrieval import RetrievalSet, read_split, swap_groups
from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest

FEATURE_DIM = 16  # the demo's region features
MAX_TEXT_LEN, MAX_REGIONS = 24, 8


def tiny_config(tokenizer, **kw) -> CrossModalConfig:
    return CrossModalConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        region_feature_dim=FEATURE_DIM, iais_layers=[0, -1], cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    return AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))


@pytest.fixture(scope="module")
def collator(tokenizer):
    return Collator(tokenizer, MAX_TEXT_LEN, RegionFields(MAX_REGIONS))


@pytest.fixture(scope="module")
def test_set(tiny_demo):
    return RetrievalSet.from_samples(read_split(tiny_demo / "test", RegionFields(MAX_REGIONS)))


@pytest.fixture(scope="module")
def swaps(tiny_demo):
    return swap_groups(read_split(tiny_demo / "swap", RegionFields(MAX_REGIONS)))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return CrossModalModel(tiny_config(tokenizer)).eval()


@pytest.fixture(scope="module")
def itc_model(tokenizer):
    torch.manual_seed(1)
    return CrossModalModel(tiny_config(tokenizer, itc_dim=8)).eval()


def save_hf(model, tokenizer, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_folder(itc_model, tokenizer, tmp_path_factory):
    """A Hugging Face folder of the tiny model with an ITC head."""
    return save_hf(itc_model, tokenizer, tmp_path_factory.mktemp("hf") / "hf_model")


@pytest.fixture(scope="module")
def plain_hf_folder(model, tokenizer, tmp_path_factory):
    """A Hugging Face folder of the tiny model without ITC head."""
    return save_hf(model, tokenizer, tmp_path_factory.mktemp("hf") / "plain_hf_model")


# --------------------------------------------------------------------------- report


def test_fresh_model_report_flags_degenerate_attention(model, collator, test_set, swaps):
    report = ev.evaluate(model, ev.EvalData(collator, test_set, swaps), batch_size=64)
    assert report["images"] == 16 and report["captions"] == 32 and report["pairs_scored"] == 512
    assert report["protocol"] == "all_pairs" and report["pairs_per_second"] == pytest.approx(512 / report["seconds"])
    rel = report["relations"]
    for layer in (0, 1):
        for a in iais.ALIGNMENTS:
            for d in ("L", "V"):
                entry = rel[f"layer{layer}/isd_{d}/{a}"]
                assert entry["n"] == 32 and sum(entry["hist"]["counts"]) == 32
                assert entry["p10"] <= entry["p50"] <= entry["p90"] and math.isfinite(entry["mean"])
        for name in ev.ENTROPY_NAMES:
            assert rel[f"layer{layer}/entropy/{name}"]["mean"] > ev.DEGENERATE_ENTROPY  # near-uniform at init
    assert report["degenerate_layers"] == [0, 1]
    assert "trivially low" in report["warnings"][0] and "uniform attention" in report["warnings"][0]
    table = ev.markdown_table(report)
    assert table.startswith("**WARNING: ISD is trivially low at layer 0, 1")
    assert "| layer1/isd_L/singular |" in table and "| all pairs | 512 |" in table
    assert "phrase-box" in report["isda"] and report["relation_swap"]["groups"] == 6
    json.dumps(report)  # serialisable as it is


def test_no_warning_when_attention_is_not_flat():
    rel = {f"layer3/entropy/{n}": {"mean": m} for n, m in zip(ev.ENTROPY_NAMES, (0.99, 0.99, 0.95, 0.99))}
    assert ev.degenerate_layers(rel) == []
    rel["layer3/entropy/A_t2i"]["mean"] = 0.985
    assert ev.degenerate_layers(rel) == [3]


def test_relation_values_match_the_iais_functions(model, collator, test_set):
    texts = collator.texts(test_set.captions[:5])
    images = collator.images([test_set.images[i] for i in test_set.caption_image[:5].tolist()])
    values = ev.relation_values(model, texts, images, ["distributed"], batch_size=2)
    out = model(**texts, **images, iais_request=IaisRequest(torch.arange(5), alignment=None))
    rel = out.relations[-1]
    torch.testing.assert_close(values["layer1/isd_V/distributed"], iais.isd(rel, alignment="distributed", direction="V"))
    torch.testing.assert_close(values["layer1/entropy/S_L"], iais.attention_entropy(rel)["S_L"])


def test_isda_hook_reports_annotated_pairs_only(model, collator, test_set):
    texts = collator.texts(test_set.captions[:4])
    images = collator.images([test_set.images[i] for i in test_set.caption_image[:4].tolist()])
    w2r = torch.full_like(texts["text_ids"], -1)
    w2r[0, 1:4] = torch.tensor([0, 1, 1])  # caption 0: three words annotated
    w2r[2, 2] = 0  # caption 2: one word
    values = ev.relation_values(model, texts, images, ["singular"], batch_size=4, word_to_region=w2r)
    isda = values["layer1/isda_L"]
    assert isda[[0, 2]].isfinite().all() and isda[[1, 3]].isnan().all()
    assert ev.phrase_annotations(test_set, texts) is None  # no shard carries phrase boxes yet


# --------------------------------------------------------------------------- re-ranking


def test_split_metrics_with_unshortlisted_candidates():
    # 12 images, caption c of image c, shortlists of k = 2 captions per image; -inf outside them.
    n = 12
    i2t = torch.full((n, n), -math.inf)
    i2t[torch.arange(n), torch.arange(n)] = 2.0
    i2t[torch.arange(n), (torch.arange(n) + 1) % n] = 1.0
    i2t[0, 0], i2t[0, 5] = -math.inf, 3.0  # image 0: its caption is not shortlisted -> never credited
    i2t[1, 1], i2t[1, 2] = 1.0, 2.0  # image 1: its caption is shortlisted second -> rank 1
    m = ev.split_metrics(i2t, i2t.clone(), torch.arange(n))
    assert m["tr_r1"] == pytest.approx(100 * 10 / 12)
    assert m["tr_r5"] == m["tr_r10"] == pytest.approx(100 * 11 / 12)
    assert m["rsum"] == pytest.approx(sum(m[k] for k in ev.METRIC_KEYS[:-1]))


def test_rerank_with_every_candidate_equals_all_pairs(itc_model, collator, test_set, swaps):
    texts, images = collator.texts(test_set.captions), collator.images(test_set.images)
    n_img, n_txt = len(test_set.images), len(test_set.captions)
    all_scores = ev.score_pairs(
        itc_model, texts, images, torch.arange(n_txt).repeat(n_img), torch.arange(n_img).repeat_interleave(n_txt), 64
    ).view(n_img, n_txt)
    txt, img = ev.sharded_itc_embeddings(itc_model, texts, images, 64)
    i2t, t2i, pairs = ev.rerank_scores(itc_model, texts, images, img @ txt.T, max(n_img, n_txt), 64)
    assert pairs == n_img * n_txt
    assert torch.equal(i2t, all_scores) and torch.equal(t2i, all_scores)

    report = ev.evaluate(itc_model, ev.EvalData(collator, test_set, swaps), batch_size=64, isd_alignments=["singular"],
                         rerank_k=n_txt)
    rr = report["rerank"]
    assert {k: rr[k] for k in ev.METRIC_KEYS} == {k: report[k] for k in ev.METRIC_KEYS}
    assert rr["pairs_scored"] == rr["pairs_all"] == 512
    assert rr["pairs_per_second"] == pytest.approx(512 / rr["cross_encoder_seconds"]) and rr["reduction"] == 1.0
    assert set(ev.METRIC_KEYS) <= set(report["itc"]) and report["relation_swap_itc"]["groups"] == 6
    assert "| ITC top-32 + re-rank | 512 |" in ev.markdown_table(report)


class CountingModel(CrossModalModel):
    """Counts the rows its encoder sees."""

    rows = 0

    def forward(self, *args, **kwargs):
        CountingModel.rows += (args[0] if args else kwargs["text_ids"]).shape[0]
        return super().forward(*args, **kwargs)


def test_rerank_scores_exactly_k_pairs_per_query(itc_model, collator, test_set):
    counting = CountingModel(itc_model.config).eval()
    counting.load_state_dict(itc_model.state_dict())
    texts, images = collator.texts(test_set.captions), collator.images(test_set.images)
    n_img, n_txt, k = len(test_set.images), len(test_set.captions), 3
    txt, img = ev.sharded_itc_embeddings(counting, texts, images, 64)
    sim = img @ txt.T
    CountingModel.rows = 0
    i2t, t2i, pairs = ev.rerank_scores(counting, texts, images, sim, k, batch_size=7)
    assert (i2t.isfinite().sum(1) == k).all() and (t2i.isfinite().sum(0) == k).all()
    # Each image query's shortlist is its ITC top k, each caption query's likewise.
    assert torch.equal(i2t.isfinite(), torch.zeros_like(sim, dtype=torch.bool).scatter_(1, sim.topk(k, 1).indices, True))
    assert torch.equal(t2i.isfinite(), torch.zeros_like(sim, dtype=torch.bool).scatter_(0, sim.topk(k, 0).indices, True))
    union = i2t.isfinite() | t2i.isfinite()
    assert pairs == union.sum() == CountingModel.rows and pairs <= k * (n_img + n_txt)
    # The scores are the cross-encoder's: equal to all-pairs scoring at the same pairs.
    all_scores = ev.score_pairs(
        counting, texts, images, torch.arange(n_txt).repeat(n_img), torch.arange(n_img).repeat_interleave(n_txt), 64
    ).view(n_img, n_txt)
    torch.testing.assert_close(torch.maximum(i2t, t2i)[union], all_scores[union], rtol=0, atol=1e-5)

    report = ev.evaluate(counting, ev.EvalData(collator, test_set), batch_size=64, isd_alignments=["singular"], rerank_k=k,
                         all_pairs=False)
    assert report["protocol"] == "rerank@3" and report["pairs_scored"] == pairs < 512
    assert report["rsum"] == report["rerank"]["rsum"]


def test_rerank_needs_an_itc_head(model, collator, test_set):
    with pytest.raises(ValueError, match="ITC"):
        ev.evaluate(model, ev.EvalData(collator, test_set), rerank_k=3)
    with pytest.raises(ValueError, match="rerank_k"):
        ev.evaluate(model, ev.EvalData(collator, test_set), all_pairs=False)


def test_rerank_benchmark(itc_model, plain_hf_folder, collator, test_set, tiny_demo, capsys):
    spec = importlib.util.spec_from_file_location("rerank_bench", ROOT / "benchmarks" / "rerank.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    k = bench.default_k(16, 32)
    result = bench.compare(itc_model, collator, test_set, k, 64)
    assert result["all_pairs"]["pairs"] >= 10 * result["rerank"]["pairs"]
    assert "x fewer cross-encoder pairs" in bench.format_result(result, 16, 32)
    # A checkpoint without ITC: the benchmark says it is pending.
    assert bench.main(["--checkpoint", str(plain_hf_folder), "--data", str(tiny_demo)]) == bench.PENDING
    assert "PENDING" in capsys.readouterr().out


# --------------------------------------------------------------------------- the launcher


def test_launcher_on_hf_folder_writes_report_and_plots(hf_folder, tiny_demo, tmp_path, capsys):
    out = tmp_path / "eval"
    code = launcher().main(["--checkpoint", str(hf_folder), "--data", str(tiny_demo), "--out", str(out),
                            "--batch-size", "64", "--rerank-k", "3", "--plots", "--plot-index", "0", "3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 16 and report["ranks"] == 1 and report["checkpoint"]["kind"] == "hf"
    assert report["rerank"]["k"] == 3 and report["rerank"]["pairs_scored"] <= 3 * (16 + 32)
    assert "| ITC top-3 + re-rank |" in printed and "| ITC only | 0 |" in printed
    assert report["relation_swap"]["groups"] == 6
    assert (out / "eval.md").read_text().strip() in printed and "| TR R@1 |" in printed
    assert len((out / "eval_history.jsonl").read_text().splitlines()) == 1
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["pair0_layer0.png", "pair0_layer1.png", "pair3_layer0.png", "pair3_layer1.png"]
    assert "curves: not drawn" in printed  # a stand-alone HF folder has no training steps
    assert launcher().main(["--checkpoint", str(tmp_path), "--data", str(tiny_demo)]) == 2  # not a checkpoint


DS_SCRIPT = """
import sys
from pathlib import Path
import deepspeed, torch
from transformers import AutoTokenizer
from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest
hf, run = Path(sys.argv[1]), Path(sys.argv[2])
model = CrossModalModel.from_pretrained(hf)
tok = AutoTokenizer.from_pretrained(hf, config=model.config)
ds = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "zero_optimization": {"stage": 2}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=ds)
g = torch.Generator().manual_seed(0)
batch = dict(text_ids=torch.randint(5, len(tok), (2, 6), generator=g), text_attention=torch.ones(2, 6, dtype=torch.bool),
             region_features=torch.randn(2, 3, 16, generator=g), region_geometry=torch.rand(2, 3, 7, generator=g),
             region_attention=torch.ones(2, 3, dtype=torch.bool))
engine.backward(engine.module.itm_logit(engine(**batch)).pow(2).mean())
engine.step()  # the checkpoint holds trained weights, not the initial ones
from iais_scale.checkpoint import Checkpointer
Checkpointer(run, rank=0, world=1, keep=3).save(engine, "step7", {"step": 7}, {})  # as the trainer saves
engine.save_checkpoint(str(run / "checkpoints"), tag="step8")  # a save cut short: no COMPLETE marker
engine.module.config.save_pretrained(run / "model")  # what the trainer will write at the start of a run
tok.save_pretrained(run / "model")
engine.module.save_pretrained(run / "hf_after_step")
tok.save_pretrained(run / "hf_after_step")
"""


@pytest.mark.slow
def test_launcher_on_deepspeed_checkpoint(plain_hf_folder, tiny_demo, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(plain_hf_folder), str(run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / "step7" / "COMPLETE").is_file() and not (run / "checkpoints" / "step8" / "COMPLETE").exists()
    # The unfinished step8 is never read: named directly it is refused, "checkpoints/" means step7.
    assert launcher().main(["--checkpoint", str(run / "checkpoints" / "step8"), "--data", str(tiny_demo),
                            "--swap-split", "none"]) == 2

    reports = {}
    for name, path in (("run", run / "checkpoints"), ("tag", run / "checkpoints" / "step7"), ("hf", run / "hf_after_step")):
        out = tmp_path / f"eval_{name}"
        assert launcher().main(["--checkpoint", str(path), "--data", str(tiny_demo), "--out", str(out),
                                "--swap-split", "none", "--batch-size", "128"]) == 0
        reports[name] = json.loads((out / "eval.json").read_text())
    assert reports["run"]["checkpoint"]["kind"] == "deepspeed" and reports["run"]["checkpoint"]["step"] == 7
    assert reports["tag"]["checkpoint"]["path"].endswith("step7") and reports["run"]["checkpoint"]["path"].endswith("step7")
    assert json.loads((tmp_path / "eval_run" / "eval_history.jsonl").read_text())["step"] == 7
    for name in ("run", "tag"):  # consolidated ZeRO weights score exactly as the saved HF model
        assert {k: reports[name][k] for k in ev.METRIC_KEYS} == {k: reports["hf"][k] for k in ev.METRIC_KEYS}
        assert reports[name]["relations"] == reports["hf"]["relations"]
    untrained = load_model(plain_hf_folder)[0].state_dict()
    trained = load_model(run / "checkpoints")[0].state_dict()
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained)


@pytest.fixture(scope="module")
def sharp_hf_folder(tokenizer, tmp_path_factory):
    """A hand-made scorer: the tiny ITC model with weights drawn 25x wider than BERT's, so that its
    scores spread (std ~1, no near-ties) and every metric depends on which score lands where."""
    torch.manual_seed(1)
    model = CrossModalModel(tiny_config(tokenizer, itc_dim=8, initializer_range=0.5)).eval()
    return save_hf(model, tokenizer, tmp_path_factory.mktemp("hf") / "sharp_hf_model")


def test_the_sharp_scorer_makes_every_score_count(sharp_hf_folder, collator, test_set):
    """Why the rank test below bites: with this scorer, misplacing the scores of the last rank's
    slice (3 ranks: 171 + 171 + 170 pairs, the last padded) by one pair changes the metrics."""
    model = load_model(sharp_hf_folder)[0]
    texts, images = collator.texts(test_set.captions), collator.images(test_set.images)
    scores = ev.score_pairs(model, texts, images, torch.arange(32).repeat(16), torch.arange(16).repeat_interleave(32), 64)
    assert scores.std() > 0.5 and scores.unique().numel() == 512
    shifted = scores.clone()
    shifted[342:] = scores[341:-1]  # the third slice's scores, one pair late
    m, bad = (ev.split_metrics(s.view(16, 32), s.view(16, 32), test_set.caption_image) for s in (scores, shifted))
    assert m != bad and 0 < m["rsum"] < 600


@pytest.mark.slow
def test_three_deepspeed_ranks_give_the_metrics_of_one(sharp_hf_folder, tiny_demo, tmp_path):
    """3 ranks: 512 pairs, 32 captions, 16 images and 32 relation pairs are uneven over the ranks,
    so the last rank pads every slice; all-pairs, ITC and re-ranking metrics, relation statistics and
    swap scores must still be those of one process."""
    one, three = tmp_path / "one", tmp_path / "three"
    args = ["--checkpoint", str(sharp_hf_folder), "--data", str(tiny_demo), "--batch-size", "5", "--rerank-k", "3"]
    assert launcher().main([*args, "--out", str(one)]) == 0
    cmd = [shutil.which("deepspeed") or sys.exit("deepspeed launcher not on PATH"), "--num_gpus", "3",
           "--master_port", str(free_port()), "launchers/evaluate.py", *args, "--out", str(three)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| TR R@1 |" in proc.stdout
    a, b = (json.loads((d / "eval.json").read_text()) for d in (one, three))
    assert a["ranks"] == 1 and b["ranks"] == 3
    assert 0 < a["rsum"] < 600 and a["rsum"] != a["itc"]["rsum"]
    for part in (None, "itc", "rerank"):
        x, y = (a, b) if part is None else (a[part], b[part])
        assert {k: y[k] for k in ev.METRIC_KEYS} == pytest.approx({k: x[k] for k in ev.METRIC_KEYS}, abs=1e-9), part
    assert b["rerank"]["pairs_scored"] == a["rerank"]["pairs_scored"]
    assert b["relation_swap"] == a["relation_swap"] and b["relation_swap_itc"] == a["relation_swap_itc"]
    assert b["degenerate_layers"] == a["degenerate_layers"]
    assert a["relations"].keys() == b["relations"].keys()
    for key, entry in a["relations"].items():
        for stat in ("mean", "p10", "p50", "p90"):
            assert b["relations"][key][stat] == pytest.approx(entry[stat], rel=1e-6, abs=1e-9), (key, stat)
        assert b["relations"][key]["hist"] == entry["hist"]


# --------------------------------------------------------------------------- pictures


def test_pair_matrices_are_the_cropped_relations(model, collator, test_set):
    sample = test_set.images[0]
    inputs = {**collator.texts(sample.captions[:1]), **collator.images([sample])}
    rel = model(**inputs, iais_request=IaisRequest(torch.arange(1), alignment=None)).relations[-1]
    mats = viz.pair_matrices(rel)
    t, v = int(rel.word_mask.sum()), len(sample.boxes)
    assert mats["S_L"].shape == (t, t) and mats["A_t2i"].shape == (t, v) and mats["S_V"].shape == (v, v)
    torch.testing.assert_close(torch.from_numpy(mats["P_L/distributed"]),
                               torch.from_numpy(mats["A_t2i"] @ mats["A_i2t"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(mats["S_V"].sum(1)), torch.ones(v), rtol=0, atol=1e-5)
    assert mats["ISD_L/singular"] == pytest.approx(float(iais.isd(rel, alignment="singular", direction="L")[0]))


def test_viz_pairs_command_draws_labelled_pngs(hf_folder, tiny_demo, tmp_path, capsys):
    assert viz.main(["pairs", "--checkpoint", str(hf_folder), "--data", str(tiny_demo), "--split", "test",
                     "--index", "0", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["pair0_layer0.png", "pair0_layer1.png", "pair3_layer0.png",
                                               "pair3_layer1.png"]
    for p in printed:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = viz.shard_images(tiny_demo / "test", ["test-000000", "test-000003"])
    assert set(pixels) == {"test-000000", "test-000003"} and all(b[:4] == b"\x89PNG" for b in pixels.values())


def test_viz_curves_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    train = [{"step": s, "loss": 1 / s, "isd": 0.5 / s, "entropy_S_L": 0.9 + s / 1000, "entropy_S_V": 0.95}
             for s in range(10, 101, 10)]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    evals = [{"step": s, "rsum": 100.0 + s, "rerank": {"rsum": 90.0 + s},
              "relations": {"layer3/isd_L/singular": {"mean": 0.1 / s}, "layer3/entropy/S_L": {"mean": 0.97}}}
             for s in (50, 100)]
    (run / "eval_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals) + '{"torn')
    assert viz.main(["curves", "--run", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError):
        viz.draw_curves(tmp_path / "empty", tmp_path)


@pytest.mark.slow
def test_a_pixel_model_evaluates_stand_alone_on_one_and_two_ranks(tiny_demo, tmp_path):
    """A model trained on pixels (model.image_input=patches) is evaluated by the launcher as the trainer
    evaluates it, with the same metrics on 1 and on 2 ranks (the odd split pads the last rank)."""
    run = tmp_path / "run"
    train(tiny_demo, run, "train.steps=3", "model.image_input=patches", "model.image_size=64", "model.patch_size=16")
    trained = json.loads((run / "eval.json").read_text())
    args = ["--checkpoint", str(run), "--data", str(tiny_demo), "--max-images", "15", "--batch-size", "7"]
    assert launcher().main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launchers/evaluate.py",
                           *args, "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    one, two = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("one", "two"))
    assert one["images"] == two["images"] == 15 and two["ranks"] == 2
    for k in ev.METRIC_KEYS:
        assert one[k] == pytest.approx(two[k], abs=1e-9), k
    assert one["relation_swap"] == two["relation_swap"]
    # The same weights through the trainer's own evaluation: the full test split there, 15 images here.
    full = launcher().main(["--checkpoint", str(run), "--data", str(tiny_demo), "--out", str(tmp_path / "full")])
    assert full == 0
    report = json.loads((tmp_path / "full" / "eval.json").read_text())
    for k in ev.METRIC_KEYS:
        assert report[k] == pytest.approx(trained[k], abs=1e-9), k


@pytest.mark.slow
def test_a_run_folder_is_scored_at_the_checkpoint_the_run_reported(tiny_demo, tmp_path, capsys):
    """With model selection on val the run reports its best checkpoint; evaluating the run folder
    scores that one (not the newest step) and says which and how it was chosen."""

    run = tmp_path / "run"
    code, log = finish(one_rank(f"data.root={tiny_demo}", "data.make_demo=false", "data.swap_split=null",
                                f"train.output_dir={run}", "train.steps=6", "train.log_every=1", "train.eval_every=2",
                                "data.val_split=val", "train.micro_batch_size=8", "objectives.mlm_only_steps=0",
                                "objectives.num_candidates=4", "objectives.num_hard=2", "eval.max_images=4"))
    assert code == 0, log[-3000:]
    reported = json.loads((run / "eval.json").read_text())
    step = reported["selected_by"]["step"]
    assert launcher().main(["--checkpoint", str(run), "--data", str(tiny_demo), "--swap-split", "none",
                            "--max-images", "4", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["checkpoint"]["path"] == str(run / "checkpoints" / "best") and again["checkpoint"]["step"] == step
    assert again["checkpoint"]["chosen"] == f"the run's reported checkpoint: best RSUM on val (step {step})"
    for k in ("tr_r1", "ir_r1", "rsum"):
        assert again[k] == pytest.approx(reported[k], abs=1e-9), k
    # The checkpoints/ folder still means its newest step.
    assert launcher().main(["--checkpoint", str(run / "checkpoints"), "--data", str(tiny_demo), "--swap-split", "none",
                            "--max-images", "4", "--out", str(tmp_path / "newest")]) == 0
    newest = json.loads((tmp_path / "newest" / "eval.json").read_text())
    assert newest["checkpoint"]["step"] == 6 and newest["checkpoint"]["chosen"].startswith("the newest complete")


def test_a_pixel_models_image_tokens_are_drawn_as_its_grid():
    """Patch models have no boxes: their r0..r15 are the cells of a 4x4 grid, row by row."""
    import numpy as np

    from iais_scale.data.samples import ImageSample

    sample = ImageSample(key="k", image_id="k", captions=["a"], width=64, height=32,
                         features=np.zeros((0, 0), np.float32), boxes=np.zeros((0, 4), np.float32))
    cells = viz._grid_boxes(sample, 16)
    assert len(cells) == 16 and cells[0] == (0, 0, 16, 8) and cells[5] == (16, 8, 32, 16) and cells[15] == (48, 24, 64, 32)
    assert viz._grid_boxes(sample, 10) == []  # not a square grid: nothing guessed
