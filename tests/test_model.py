"""The single-stream model: IAIS through the encoder, activation checkpointing, save/load."""

from __future__ import annotations

import torch

from iais_scale import iais
from iais_scale.model import CrossModalConfig, CrossModalModel, IaisRequest

CLS, SEP, PAD = 2, 3, 0


def tiny_model(**kw) -> CrossModalModel:
    cfg = CrossModalConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        region_feature_dim=6, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )
    torch.manual_seed(0)
    return CrossModalModel(cfg)


def batch(p: int = 5, lt: int = 9, lr: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (p, lt), generator=g)
    n_words = torch.tensor([1, 3, 7, 5, 2])[:p]
    n_regions = torch.tensor([6, 1, 4, 3, 0])[:p]  # the last pair has no region
    pos = torch.arange(lt)
    ids[:, 0] = CLS
    ids[pos[None] == n_words[:, None] + 1] = SEP
    ids[pos[None] > n_words[:, None] + 1] = PAD
    return {
        "text_ids": ids,
        "text_attention": ids != PAD,
        "region_features": torch.randn(p, lr, 6, generator=g),
        "region_geometry": torch.rand(p, lr, 7, generator=g),
        "region_attention": torch.arange(lr)[None] < n_regions[:, None],
    }


def test_word_mask_excludes_cls_sep_and_padding():
    m, b = tiny_model(), batch()
    words = m.word_mask(b["text_ids"], b["text_attention"])
    assert words.sum(1).tolist() == [1, 3, 7, 5, 2]
    assert not words[:, 0].any()


def test_encoder_iais_term_equals_the_pure_function_on_the_layer_projections():
    m, b = tiny_model(iais_layers=[1]), batch()
    m.eval()
    captured = {}
    m.layers[1].register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    rows = torch.tensor([0, 2, 3])
    out = m(**b, iais_request=IaisRequest(rows, "distributed", "both"))
    x = captured["x"][rows]
    attn = m.layers[1].attention.self
    q = attn.query(x).view(3, x.shape[1], 4, 8).transpose(1, 2)
    k = attn.key(x).view(3, x.shape[1], 4, 8).transpose(1, 2)
    lt = b["text_ids"].shape[1]
    text = torch.cat([m.word_mask(b["text_ids"], b["text_attention"]), torch.zeros(5, 6, dtype=torch.bool)], 1)
    image = torch.cat([torch.zeros(5, lt, dtype=torch.bool), b["region_attention"]], 1)
    rel = iais.relation_matrices(q, k, text[rows], image[rows])
    want = iais.iais_loss(rel, alignment="distributed", direction="both", reduction="none")
    torch.testing.assert_close(out.iais_loss, want, rtol=1e-5, atol=1e-7)


def _grads(checkpointing: int) -> list[torch.Tensor]:
    m, b = tiny_model(iais_layers=[0, -1], gradient_checkpointing_every=checkpointing), batch()
    m.train()
    out = m(**b, iais_request=IaisRequest(torch.tensor([0, 1, 3]), "singular", "L"))
    loss = m.itm_logit(out).sum() + out.iais_loss.sum()
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]


def test_checkpointing_gives_the_same_gradients():
    plain, ckpt = _grads(0), _grads(1)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, c in zip(plain, ckpt):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-8)


def test_pair_without_region_gives_zero_iais_and_finite_gradients():
    m, b = tiny_model(), batch()
    out = m(**b, iais_request=IaisRequest(torch.arange(5), "congruence", "both"))
    assert out.iais_loss[4] == 0
    out.iais_loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_save_and_load_round_trip(tmp_path):
    m, b = tiny_model(), batch()
    m.eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = CrossModalModel.from_pretrained(tmp_path).eval()
    assert loaded.mlm.predictions.decoder.weight is loaded.text_embeddings.word_embeddings.weight
    torch.testing.assert_close(loaded.itm_logit(loaded(**b)), m.itm_logit(m(**b)))


def test_itc_embeddings_are_unimodal_and_normalised():
    m, b = tiny_model(itc_dim=8), batch()
    m.eval()
    t = m.itc_text(b["text_ids"], b["text_attention"])
    i = m.itc_image(region_features=b["region_features"], region_geometry=b["region_geometry"],
                    region_attention=b["region_attention"])
    assert t.shape == i.shape == (5, 8)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(5))
    # The text embedding ignores any image: changing the regions leaves it unchanged.
    b2 = {**b, "region_features": torch.randn_like(b["region_features"])}
    torch.testing.assert_close(m.itc_text(b2["text_ids"], b2["text_attention"]), t)
    i2 = m.itc_image(region_features=b2["region_features"], region_geometry=b["region_geometry"],
                     region_attention=b["region_attention"])
    assert not torch.allclose(i2[:4], i[:4])  # (the last pair has no region)


def test_mrfr_head_regresses_features_through_the_tied_projection():
    m, b = tiny_model(), batch()
    out = m(**b)
    pred = m.mrfr_predictions(out, b["text_ids"].shape[1])
    assert pred.shape == b["region_features"].shape
    pred.sum().backward()
    assert m.region_embeddings.feature_linear.weight.grad is not None


def test_patch_input_encodes_pixels():
    m = tiny_model(image_input="patches", image_size=32, patch_size=8)
    b = batch()
    pixels = torch.randn(5, 3, 32, 32)
    out = m(b["text_ids"], b["text_attention"], pixel_values=pixels,
            iais_request=IaisRequest(torch.tensor([0, 1]), "singular", "both"))
    assert out.hidden.shape[1] == b["text_ids"].shape[1] + 16  # 4 x 4 patches
    assert out.iais_loss.shape == (2,) and torch.isfinite(out.iais_loss).all()
