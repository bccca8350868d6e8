"""The paper's path from the released assets, in miniature: UNITER's img_db + txt_db (real lmdb, msgpack,
lz4 packages, UNITER's layout) -> shards; Flickr30k Entities -> phrases; a tiny UNITER-keyed checkpoint
with a cased vocabulary -> 2-rank fine-tuning with configs/flickr30k_uniter_base_iais.yaml shrunk by
overrides -> a report with ISD and ISDa, the model selected on val; the recipes' values against the
authors' (lancopku/IAIS config/train-itm-*-8gpu-hn.json, train_itm_hard_negatives.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, free_port

from data_tools.__main__ import main as data_tools
from iais_scale.config import ConfigError, batch_plan, load_config
from iais_scale.engine import check_inputs

lmdb = pytest.importorskip("lmdb")
msgpack = pytest.importorskip("msgpack")
lz4_frame = pytest.importorskip("lz4.frame")

H, LAYERS, INTER, F = 16, 2, 32, 16
WORDS = ("A The a the man woman dog cat red blue green bike ball park beach runs sits rides holds near on in with "
         "of . , Two two small big").split()
SPLITS = {"train": 12, "val": 4, "test": 4}


def cased_tokenizer(folder: Path):
    """A cased BERT WordPiece tokenizer ("A" and "a" are different tokens), as UNITER's bert-base-cased."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "tokenizer_class": "BertTokenizer"}))
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.save_pretrained(folder)
    assert tok.convert_tokens_to_ids("A") != tok.convert_tokens_to_ids("a")
    return tok


def caption(rng: np.random.Generator) -> str:
    subject = rng.choice(["A man", "A woman", "The dog", "Two cats"])
    return f"{subject} {rng.choice(['runs', 'sits', 'rides'])} near a {rng.choice(['red', 'blue'])} ball ."


def write_lmdb(path: Path, items: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), map_size=32 << 20)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def uniter_checkpoint(path: Path, vocab: int) -> None:
    """A tiny checkpoint under UNITER's names (uniter.*, itm_output, cls.predictions, feat_regress)."""
    g = torch.Generator().manual_seed(0)

    def lin(name, out, inp):
        return {f"{name}.weight": 0.1 * torch.randn(out, inp, generator=g), f"{name}.bias": torch.zeros(out)}

    def norm(name):
        return {f"{name}.weight": torch.ones(H), f"{name}.bias": torch.zeros(H)}

    e, i = "uniter.embeddings", "uniter.img_embeddings"
    sd = {f"{e}.word_embeddings.weight": 0.1 * torch.randn(vocab, H, generator=g),
          f"{e}.position_embeddings.weight": 0.1 * torch.randn(512, H, generator=g),
          f"{e}.token_type_embeddings.weight": 0.1 * torch.randn(2, H, generator=g), **norm(f"{e}.LayerNorm")}
    sd |= lin(f"{i}.img_linear", H, F) | norm(f"{i}.img_layer_norm") | lin(f"{i}.pos_linear", H, 7)
    sd |= norm(f"{i}.pos_layer_norm") | norm(f"{i}.LayerNorm")
    for n in range(LAYERS):
        p = f"uniter.encoder.layer.{n}"
        for proj in ("query", "key", "value"):
            sd |= lin(f"{p}.attention.self.{proj}", H, H)
        sd |= lin(f"{p}.attention.output.dense", H, H) | norm(f"{p}.attention.output.LayerNorm")
        sd |= lin(f"{p}.intermediate.dense", INTER, H) | lin(f"{p}.output.dense", H, INTER) | norm(f"{p}.output.LayerNorm")
    sd |= lin("uniter.pooler.dense", H, H) | lin("itm_output", 2, H)
    torch.save(sd, path)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """UNITER's img_db/txt_db for train/val/test, Entities files for the test images, a checkpoint."""
    root = tmp_path_factory.mktemp("released")
    tok = cased_tokenizer(root / "bert-base-cased")
    rng = np.random.default_rng(0)
    img = root / "img_db" / "flickr30k"
    img.mkdir(parents=True)
    values, names = {}, {}
    for split, n in SPLITS.items():
        names[split] = [f"flickr30k_{1000 + len(values) + k:012d}.npz" for k in range(n)]
        for name in names[split]:
            xy = rng.uniform(0, 0.5, (6, 2))
            wh = rng.uniform(0.1, 0.5, (6, 2))
            values[name.encode()] = npz({"features": rng.normal(size=(6, F)).astype(np.float16),
                                         "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float16),
                                         "conf": np.full(6, 0.9, np.float16)})
    write_lmdb(img / "feat_th0.2_max8_min2_compressed", values)
    (img / "nbb_th0.2_max8_min2.json").write_text(json.dumps({k.decode(): 6 for k in values}))
    txt_dbs, captions = [], {}
    meta = {"toker": "bert-base-cased", "UNK": tok.unk_token_id, "CLS": tok.cls_token_id, "SEP": tok.sep_token_id,
            "MASK": tok.mask_token_id, "v_range": [5, len(tok)]}
    for split in SPLITS:
        db = root / "txt_db" / f"itm_flickr30k_{split}.db"
        db.mkdir(parents=True)
        items, id2len, txt2img, img2txts = {}, {}, {}, {}
        for name in names[split]:
            captions[name] = [caption(rng) for _ in range(2)]
            for text in captions[name]:
                tid = f"{split}{len(items)}"
                ids = [i for w in text.split() for i in tok(w, add_special_tokens=False)["input_ids"]]
                items[tid.encode()] = lz4_frame.compress(msgpack.dumps(
                    {"input_ids": ids, "img_fname": name, "raw": text}, use_bin_type=True))
                id2len[tid], txt2img[tid] = len(ids), name
                img2txts.setdefault(name, []).append(tid)
        write_lmdb(db, items)
        for key, obj in (("meta", meta), ("id2len", id2len), ("txt2img", txt2img), ("img2txts", img2txts)):
            (db / f"{key}.json").write_text(json.dumps(obj))
        txt_dbs.append(db)
    # Flickr30k Entities for the test images: the subject of each caption is a phrase with a box.
    (root / "Annotations").mkdir()
    (root / "Sentences").mkdir()
    for name in names["test"]:
        image_id = str(int(name[len("flickr30k_"):-4]))
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>100</width><height>100</height>"
            "<depth>3</depth></size><object><name>1</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>40</xmax>"
            "<ymax>45</ymax></bndbox></object></annotation>")
        lines = []
        for text in captions[name]:
            subject, rest = " ".join(text.split()[:2]), " ".join(text.split()[2:])
            lines.append(f"[/EN#1/people {subject}] {rest}")
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    uniter_checkpoint(root / "uniter-base.pt", len(tok))
    return {"root": root, "tokenizer": root / "bert-base-cased", "img_db": img, "txt_dbs": txt_dbs,
            "checkpoint": root / "uniter-base.pt"}


def shrunk(released: dict, data: Path, out: Path, *extra: str) -> list[str]:
    """configs/flickr30k_uniter_base_iais.yaml at miniature size, 2 CPU ranks."""
    return [f"data.root={data}", f"data.tokenizer={released['tokenizer']}", "data.num_workers=0", "data.max_regions=8",
            "model.size=custom", f"model.hidden_size={H}", f"model.num_layers={LAYERS}", "model.num_heads=2",
            f"model.intermediate_size={INTER}", f"model.region_feature_dim={F}",
            f"model.init_from=uniter:{released['checkpoint']}", "train.micro_batch_size=4",
            "objectives.num_candidates=3", "objectives.num_hard=2", "train.groups_per_step=8", "train.steps=4",
            "train.eval_every=2", "train.checkpoint_every=0", "train.deepspeed_config=configs/deepspeed/zero2.json",
            "optim.warmup_steps=1", f"train.output_dir={out}", "train.log_every=1", "eval.batch_size=64", *extra]


@pytest.mark.slow
def test_released_assets_to_a_report_with_isd_and_isda(released, tmp_path):
    data = tmp_path / "flickr30k"
    args = ["uniter", "--img-db", str(released["img_db"]), "--out", str(data), "--conf-th", "0.2", "--max-bb", "8",
            "--min-bb", "2", "--tokenizer", str(released["tokenizer"])]
    for db in released["txt_dbs"]:
        args += ["--txt-db", str(db)]
    assert data_tools(args) == 0
    root = released["root"]
    assert data_tools(["entities", "--annotations", str(root / "Annotations"), "--sentences",
                       str(root / "Sentences"), "--data", str(data), "--split", "test"]) == 0
    assert data_tools(["verify", str(data)]) == 0

    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launchers/train.py",
           "--config", "configs/flickr30k_uniter_base_iais.yaml", *shrunk(released, data, out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "8 ranking groups per step = 2 micro-step(s) x 2 ranking groups x 2 rank(s)" in log, log[-3000:]
    assert "initialised from uniter:" in log
    report = json.loads((out / "eval.json").read_text())
    # The authors' choice (eval.report: final): the last step's model on test, validation only logged.
    assert report["split"] == "test" and report["images"] == 4 and "selected_by" not in report
    assert report["reported"] == {"checkpoint": "final", "step": 4, "eval.report": "final"}
    assert "Reported checkpoint: step 4, the final step (eval.report: final)" in (out / "eval.md").read_text()
    rel = report["relations"]
    for key in ("layer1/isd_L/singular", "layer1/isd_V/singular", "layer1/isda_L", "layer1/isda_V"):
        assert rel[key]["n"] > 0 and np.isfinite(rel[key]["mean"]), (key, rel.get(key))
    assert "isda" not in report or not isinstance(report["isda"], str)
    history = [json.loads(line) for line in (out / "eval_history.jsonl").read_text().splitlines()]
    assert [r["split"] for r in history] == ["val", "test"]  # (no selection: the last step is not validated)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("itm_rank" in r and "iais" in r for r in records)


def test_a_tokenizer_unlike_the_checkpoint_is_a_config_error(released, tiny_demo, tmp_path):
    """The demo's uncased tokenizer with a cased UNITER checkpoint: reported before any process
    group, with both sizes and the likely cause."""
    cfg = load_config(ROOT / "configs/flickr30k_uniter_base_iais.yaml",
                      [*shrunk(released, tiny_demo, tmp_path / "run"), f"data.tokenizer={tiny_demo / 'tokenizer'}",
                       "data.val_split=val"])
    problems = check_inputs(cfg, world=2)
    vocab = [p for p in problems if p.startswith("data.tokenizer")]
    assert vocab and "word embeddings" in vocab[0] and "the tokenizer is not the one the checkpoint" in vocab[0]
    n_ckpt = torch.load(released["checkpoint"])["uniter.embeddings.word_embeddings.weight"].shape[0]
    assert f"{n_ckpt} word" in vocab[0]


def test_uniter_vocabulary_hint_names_the_cased_bert(tmp_path, tiny_demo):
    ckpt_path = tmp_path / "uniter.pt"
    torch.save({"uniter.embeddings.word_embeddings.weight": torch.zeros(28996, 4)}, ckpt_path)
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={tiny_demo}", "data.make_demo=false",
                                                   f"model.init_from=uniter:{ckpt_path}"])
    problems = check_inputs(cfg, world=1)
    assert any("28996 word embeddings" in p and "bert-base-cased" in p for p in problems), problems


# --------------------------------------------------------------------------- the recipes


AUTHORS = {  # lancopku/IAIS config/train-itm-{flickr,coco}-{base,large}-8gpu-hn.json + the trainer's code
    "flickr30k_uniter_base_iais": dict(lr=5e-5, size="base"),
    "flickr30k_uniter_large_iais": dict(lr=5e-5, size="large"),
    "coco_uniter_large_iais": dict(lr=3e-5, size="large"),
}


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_recipes_hold_the_authors_values(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    want = AUTHORS[name]
    o, t, opt = cfg.objectives, cfg.train, cfg.optim
    assert (cfg.model.size, opt.lr) == (want["size"], want["lr"])
    assert (opt.betas, opt.eps, opt.weight_decay, opt.warmup_steps, opt.grad_clip) == ((0.9, 0.98), 1e-6, 0.01, 500, 2.0)
    assert (t.steps, t.micro_batch_size, o.anchors_per_batch, o.num_candidates, o.num_hard) == (5000, 400, 1, 399, 31)
    assert (o.itm_rank_loss, o.margin, o.mining, o.group_kinds, o.mlm_weight) == ("hinge", 0.2, "cross", "both", 0.0)
    assert (o.iais.alignment, o.iais.direction, o.iais.layers, o.iais.schedule) == ("singular", "alternate", [-1], "exp")
    assert o.iais.weight == 8.0  # the authors divide the rank loss by their 8 iterations, not IAIS
    assert (cfg.model.dropout, cfg.model.uniter_itm_init) == (0.1, "row1")
    assert (cfg.data.max_text_len, cfg.data.max_train_caption_tokens, cfg.data.max_regions) == (62, 60, 100)
    assert cfg.data.tokenizer.endswith("-cased") and cfg.data.val_split == "val" and cfg.data.eval_split == "test"
    # What the authors' code does where torch's AdamW and DeepSpeed differ (docs/reproduce.md).
    assert (opt.no_decay, opt.eps_mode, opt.schedule_steps, cfg.eval.report) == ("uniter", "uniter", "all", "final")
    assert o.group_anchors == "separate"  # the authors' two independently shuffled loaders
    assert json.loads((ROOT / t.deepspeed_config).read_text())["fp16"]["enabled"] is True
    # 8 iterations x 2 groups on each of 8 GPUs per step, on any world size that divides it.
    for world, accum in ((1, 64), (2, 32), (8, 8), (64, 1)):
        assert batch_plan(cfg, world)[0] == accum
    with pytest.raises(ConfigError, match="cannot be split"):
        batch_plan(cfg, 3)
    baseline = load_config(ROOT / "configs" / f"{name.replace('_iais', '_baseline')}.yaml")
    assert baseline.objectives.iais.enabled is False
    assert {k: v for k, v in vars(baseline.optim).items()} == {k: v for k, v in vars(opt).items()}


def test_uniter_weight_decay_rule_decays_the_region_norms_only():
    """UNITER's build_optimizer: no decay where the name holds bias, LayerNorm.weight or LayerNorm.bias;
    its img_layer_norm / pos_layer_norm (here feature_norm / box_norm) weights therefore decay."""
    from iais_scale.engine import decays
    from iais_scale.model import CrossModalConfig, CrossModalModel

    model = CrossModalModel(CrossModalConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, region_feature_dim=16, iais_layers=[-1]))
    differ = {n for n, p in model.named_parameters() if decays(n, p.dim(), "uniter") != decays(n, p.dim(), "vectors")}
    # (UNITER's MRFR head names its LayerNorm by index, net.2: decayed there too; fine-tuning never uses it)
    assert differ == {"region_embeddings.feature_norm.weight", "region_embeddings.box_norm.weight", "mrfr.net.2.weight"}
    assert not decays("layers.0.attention.output.LayerNorm.weight", 1, "uniter")
    assert not decays("region_embeddings.norm.weight", 1, "uniter")  # UNITER's img_embeddings.LayerNorm
    assert decays("layers.0.attention.self.query.weight", 2, "uniter")


def test_uniter_eps_gives_the_authors_adamw_step():
    """torch's AdamW with set_uniter_eps before each update takes the step of UNITER's optim/adamw.py
    (eps added to sqrt(v) before the bias correction), written out below; plain torch eps does not."""
    from iais_scale.engine import set_uniter_eps

    lr, betas, eps = 5e-5, (0.9, 0.98), 1e-6
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, generator=g, dtype=torch.float64)
    grads = [torch.randn(64, generator=g, dtype=torch.float64) * 1e-5 for _ in range(4)]  # small: eps matters

    def authors():  # UNITER's AdamW.step, weight decay 0
        p, m, v = start.clone(), torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
        for t, grad in enumerate(grads, 1):
            m = m * betas[0] + (1 - betas[0]) * grad
            v = v * betas[1] + (1 - betas[1]) * grad * grad
            step_size = lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t)
            p = p - step_size * m / (v.sqrt() + eps)
        return p

    def torch_adamw(uniter: bool):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        for grad in grads:
            p.grad = grad.clone()
            if uniter:
                set_uniter_eps(opt, eps, betas[1])
            opt.step()
        return p.detach()

    want = authors()
    torch.testing.assert_close(torch_adamw(True), want, rtol=0, atol=1e-15)
    assert (torch_adamw(False) - want).abs().max() > 1e-7
