"""Each image input is defined once (model/image_inputs.py): a fourth one is a class and an entry
in IMAGE_INPUTS, and the config, the collator, training and evaluation follow it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from iais_scale import evaluate as ev
from iais_scale.config import ConfigError, load_config
from iais_scale.data.image_fields import PixelFields, RegionFields
from iais_scale.data.pipeline import PairStream
from iais_scale.data.tokenizer import load_tokenizer
from iais_scale.engine import build_model, model_config
from iais_scale.model import CrossModalConfig, CrossModalModel
from iais_scale.model.backbone import grid_geometry
from iais_scale.model.embeddings import RegionEmbeddings
from iais_scale.model.encoder import image_tensors, select_pairs
from iais_scale.model.hub import image_processor_config
from iais_scale.model.image_inputs import IMAGE_INPUTS, ImageInput
from iais_scale.objectives import training_loss

GRID = 4


class ColourGrid(ImageInput):
    """A fourth input, for the test: the image's mean colours on a 4x4 grid enter the region
    embedding (feature dimension 3) with the geometry of their cells."""

    name = "colour_grid"
    reads_pixels = True
    tensors = ("pixel_values",)

    @classmethod
    def build(cls, model, config):
        model.region_embeddings = RegionEmbeddings(config)

    @classmethod
    def embed(cls, model, type_embedding, **tensors):
        (pixels,) = cls._require(tensors)
        cells = F.adaptive_avg_pool2d(pixels.float(), GRID).flatten(2).transpose(1, 2)  # [P, 16, 3]
        boxes = grid_geometry(GRID, GRID).to(cells.device).expand(cells.shape[0], -1, -1)
        tokens = model.region_embeddings(cells.to(type_embedding.dtype), boxes.to(type_embedding.dtype), type_embedding)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    @classmethod
    def tokens_per_image(cls, model):
        return GRID * GRID


TINY_MODEL = ["model.size=tiny", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
              "model.intermediate_size=64", "model.image_size=32", "model.dropout=0.0"]


def test_a_fourth_image_input_is_one_class_and_one_entry(tiny_demo, monkeypatch):
    monkeypatch.setitem(IMAGE_INPUTS, ColourGrid.name, ColourGrid)
    cfg = load_config("demo", [f"data.root={tiny_demo}", "model.image_input=colour_grid", "model.region_feature_dim=3",
                               *TINY_MODEL, "objectives.iais.layers=[-1]"])
    tokenizer = load_tokenizer(tiny_demo / "tokenizer")
    hf_cfg = model_config(cfg, tokenizer, None)
    torch.manual_seed(0)
    model = build_model(cfg, hf_cfg)
    assert model.image_input is ColourGrid and model.image_tokens_per_image() == GRID * GRID
    assert not hasattr(model, "patch_embeddings") and not hasattr(model, "mrfr")

    # The collator follows what the input reads: pixels, normalised by the transform of its config.
    collator = ev.model_collator(tokenizer, hf_cfg, max_text_len=24)
    assert isinstance(collator.image_fields, PixelFields) and collator.image_fields.normalise
    assert collator.image_fields.transform.size == 32
    assert image_processor_config(hf_cfg.to_dict())["crop_size"] == {"height": 32, "width": 32}

    # It trains: the loss falls on repeated batches, and the gradient reaches the embedding.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = PairStream(tiny_demo / "train", collator, 8, shuffle_buffer=8, seed=0)
    batches = [{k: v for k, v in b.items() if k not in ("keys", "sample_counts")}
               for b in itertools.islice(iter(stream), 2)]
    assert batches[0]["pixel_values"].shape == (8, 3, 32, 32)
    first = before = None
    for step in range(12):
        loss, _ = training_loss(model, batches[step % 2], cfg.objectives, step=step, total_steps=12,
                                mask_id=tokenizer.mask_token_id, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first = loss.item()
            before = model.region_embeddings.feature_linear.weight.detach().clone()
            assert model.region_embeddings.feature_linear.weight.grad.abs().sum() > 0
        opt.step()
    assert torch.isfinite(loss) and loss.item() < first
    assert not torch.equal(before, model.region_embeddings.feature_linear.weight)

    # Evaluation reads the same fields: a report with recall and ISD over the grid cells.
    model.eval()
    data = ev.build_eval_data(collator, str(tiny_demo / "test"))
    report = ev.evaluate(model, data, batch_size=64, isd_alignments=["singular"])
    assert len(data.rset.images) == 16 and 0 <= report["rsum"] <= 600
    isd = report["relations"]["layer1/isd_L/singular"]
    assert isd["n"] == len(data.rset.captions) and 0 <= isd["mean"] < float("inf")


def test_an_unknown_image_input_is_a_config_error_naming_the_choices(tiny_demo):
    with pytest.raises(ConfigError, match="model.image_input: one of regions, patches, backbone"):
        load_config("demo", [f"data.root={tiny_demo}", "model.image_input=grid"])


def test_a_region_model_reads_region_fields_without_a_bound_unless_given(tiny_demo):
    tokenizer = load_tokenizer(tiny_demo / "tokenizer")
    cfg = load_config("demo", [f"data.root={tiny_demo}", *TINY_MODEL])
    hf_cfg = model_config(cfg, tokenizer, 4)
    fields = ev.model_collator(tokenizer, hf_cfg, max_text_len=24).image_fields
    assert isinstance(fields, RegionFields) and (fields.max_regions, fields.feature_dim) == (None, 4)
    assert ev.model_collator(tokenizer, hf_cfg, max_text_len=24, max_regions=8).image_fields.max_regions == 8


def test_a_model_refuses_the_tensors_of_another_input():
    kw = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              region_feature_dim=4)
    model = CrossModalModel(CrossModalConfig(**kw))
    ids = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0]])
    att = ids != 0
    with pytest.raises(ValueError, match="a regions model reads region_features, region_geometry, region_attention;"
                                         " got pixel_values"):
        model(ids, att, pixel_values=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="missing region_attention"):
        model(ids, att, region_features=torch.zeros(2, 3, 4), region_geometry=torch.zeros(2, 3, 7))
    assert model(ids, att).hidden.shape == (2, 4, 32)  # no image tensors: the text alone
    with pytest.raises(ValueError, match="image_input must be one of \\('regions', 'patches', 'backbone'\\)"):
        CrossModalModel(CrossModalConfig(**kw, image_input="grid"))
    with pytest.raises(ValueError, match="image_size 40 is not a multiple of patch_size 16"):
        CrossModalModel(CrossModalConfig(**kw, image_input="patches", image_size=40, patch_size=16))


def test_a_registered_input_s_own_tensors_travel_with_the_batch(monkeypatch):
    class Cells(ColourGrid):
        name, tensors = "cells", ("colour_cells",)

    monkeypatch.setitem(IMAGE_INPUTS, Cells.name, Cells)
    batch = {"text_ids": torch.zeros(2, 3, dtype=torch.long), "text_attention": torch.ones(2, 3, dtype=torch.bool),
             "colour_cells": torch.tensor([[0.0], [1.0]]), "keys": ["a", "b"]}
    assert set(image_tensors(batch)) == {"colour_cells"}
    pairs = select_pairs(batch, batch, torch.tensor([0, 1]), torch.tensor([1, 1]))
    assert torch.equal(pairs["colour_cells"], torch.tensor([[1.0], [1.0]])) and "keys" not in pairs
