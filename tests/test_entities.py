"""Flickr30k Entities -> ``phrases`` (``data_tools entities``) -> the word -> region alignment -> ISDa."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from data_tools.__main__ import main
from data_tools.entities import parse_annotation, parse_sentence
from iais_scale import evaluate as ev
from iais_scale.data import format as fmt
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import RegionFields
from iais_scale.data.retrieval import RetrievalSet, best_region, box_iou, read_split
from iais_scale.data.samples import Caption
from iais_scale.model import CrossModalConfig, CrossModalModel

D = 16
W, H = 200, 100
# Pixel boxes of the regions of every image: 0 left half, 1 right half, 2 a small box in the middle.
REGIONS = np.array([[0, 0, 100, 100], [100, 0, 200, 100], [80, 30, 120, 70]], np.float32)

XML = """<annotation>
<filename>{id}.jpg</filename>
<size>
<width>{w}</width>
<height>{h}</height>
<depth>3</depth>
</size>
<object>
<name>1</name>
<name>3</name>
<bndbox>
<xmin>1</xmin>
<ymin>1</ymin>
<xmax>90</xmax>
<ymax>100</ymax>
</bndbox>
</object>
<object>
<name>2</name>
<bndbox>
<xmin>111</xmin>
<ymin>11</ymin>
<xmax>200</xmax>
<ymax>100</ymax>
</bndbox>
</object>
<object>
<name>4</name>
<nobndbox>0</nobndbox>
<scene>1</scene>
</object>
</annotation>
"""

SENTENCES = {
    # Karpathy-style captions (no space before the full stop) match the Entities sentences anyway.
    "1000092795": [
        "[/EN#1/other A red circle] left of [/EN#2/other a blue square] .",
        "[/EN#3/other/people The circle] is near [/EN#4/scene the sky] .",
        "A sentence of no caption of this image .",
    ],
    "10002456": ["[/EN#2/other a blue square] right of [/EN#1/other a red circle]"],
}
CAPTIONS = {
    "1000092795": ["a blue thing", "A red circle left of a blue square.", "The circle is near the sky."],
    "10002456": ["a blue square right of a red circle"],
    "99": ["a green triangle"],  # no annotation files
}


def test_parse_sentence_gives_character_spans():
    s = parse_sentence("[/EN#18/people A man] in [/EN#19/clothing/other an orange hat] starring at [/EN#0/notvisual"
                       " something] .")
    assert s.text == "A man in an orange hat starring at something ."
    assert [(s.text[p.start:p.end], p.entity, p.types) for p in s.phrases] == [
        ("A man", "18", ["people"]), ("an orange hat", "19", ["clothing", "other"]), ("something", "0", ["notvisual"])]
    odd = parse_sentence("a [bracket] and [/EN#7/animals two dogs")  # a literal bracket, an unclosed phrase
    assert odd.text == "a [bracket] and two dogs"
    assert [(odd.text[p.start:p.end], p.entity) for p in odd.phrases] == [("two dogs", "7")]


def test_parse_annotation_normalises_boxes_of_every_name():
    ann = parse_annotation(XML.format(id=1, w=W, h=H).encode())
    assert (ann.width, ann.height) == (W, H)
    assert ann.boxes["1"] == ann.boxes["3"] == [[0.0, 0.0, 0.45, 1.0]]
    assert ann.boxes["2"] == [[0.55, 0.1, 1.0, 1.0]]
    assert "4" not in ann.boxes  # a scene entity has no box


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    return AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))


@pytest.fixture(scope="module")
def annotated(tmp_path_factory) -> Path:
    """A test split with 3 images (two annotated), converted by ``data_tools entities``."""
    root = tmp_path_factory.mktemp("entities")
    data = root / "data"
    with fmt.ShardWriter(data / "test", shard_size=2) as w:
        for i, (image_id, captions) in enumerate(CAPTIONS.items()):
            meta = {"image_id": image_id, "split": "test", "width": W, "height": H, "captions": captions}
            feat = np.random.default_rng(i).normal(size=(3, D)).astype(np.float32)
            w.write(fmt.sample_key("test", i), meta, feat=feat, boxes=REGIONS)
    fmt.Manifest(splits={"test": 3}, feature_dim=D, generator="test").write(data)
    (root / "Annotations").mkdir()
    (root / "Sentences").mkdir()
    for image_id, lines in SENTENCES.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(XML.format(id=image_id, w=W, h=H))
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    assert main(["entities", "--annotations", str(root / "Annotations"), "--sentences", str(root / "Sentences"),
                 "--data", str(data)]) == 0
    return data


def test_entities_command_adds_phrases(annotated, capsys):
    samples = {s.image_id: s for s in read_split(annotated / "test")}
    first = samples["1000092795"].meta["phrases"]
    captions = CAPTIONS["1000092795"]
    spans = [(p["caption"], captions[p["caption"]][p["start"]:p["end"]], p["entity"]) for p in first]
    assert spans == [(1, "A red circle", "1"), (1, "a blue square", "2"), (2, "The circle", "3")]
    assert first[0]["boxes"] == [[0.0, 0.0, 0.45, 1.0]]
    assert "phrases" not in samples["99"].meta
    report = json.loads((annotated / "manifest.json").read_text())["phrases"]["splits"]["test"]
    assert report["annotated_samples"] == 2 and report["missing_annotations"] == 1
    assert report["unmatched_sentences"] == 1 and report["phrases"] == 5 and report["phrases_without_box"] == 1
    capsys.readouterr()
    assert main(["verify", str(annotated)]) == 0, capsys.readouterr().out
    # A rerun finds the same phrases and leaves the shards as they are.
    before = {p.name: p.read_bytes() for p in (annotated / "test").glob("*.tar")}
    root = annotated.parent
    assert main(["entities", "--annotations", str(root / "Annotations"), "--sentences", str(root / "Sentences"),
                 "--data", str(annotated), "--split", "test"]) == 0
    assert before == {p.name: p.read_bytes() for p in (annotated / "test").glob("*.tar")}


def test_region_choice_by_iou():
    regions = REGIONS / np.array([W, H, W, H], np.float32)
    np.testing.assert_allclose(box_iou(regions[:1], regions[:1]), [[1.0]])
    assert best_region(regions, [[0.0, 0.0, 0.45, 1.0]]) == 0
    assert best_region(regions, [[0.9, 0.9, 0.95, 0.95], [0.42, 0.32, 0.58, 0.68]]) == 2  # best over any box
    assert best_region(regions[2:], [[0.0, 0.0, 0.1, 0.1]]) == -1  # no overlap: no alignment


def test_word_to_region_matches_a_hand_computed_alignment(annotated, tokenizer):
    rset = RetrievalSet.from_samples(read_split(annotated / "test"))
    collator = Collator(tokenizer, 24, RegionFields(3))
    w2r = ev.phrase_annotations(rset, collator)
    texts = collator.texts(rset.captions)
    assert w2r.shape == texts["text_ids"].shape
    row = rset.captions.index("A red circle left of a blue square.")
    # [CLS] a red circle left of a blue square [UNK] [SEP]: "A red circle" -> left half (0), "a blue square"
    # -> right half (1); the demo tokenizer knows these words, so each is one piece.
    assert tokenizer.convert_ids_to_tokens(texts["text_ids"][row, :9].tolist()) == [
        "[CLS]", "a", "red", "circle", "left", "of", "a", "blue", "square"]
    assert w2r[row, :11].tolist() == [-1, 0, 0, 0, -1, -1, 1, 1, 1, -1, -1]
    row = rset.captions.index("The circle is near the sky.")
    expect = [-1] * w2r.shape[1]
    pieces = tokenizer("The circle", add_special_tokens=False)["input_ids"]
    expect[1 : 1 + len(pieces)] = [0] * len(pieces)  # entity 3 shares entity 1's box; "the sky" has none
    assert w2r[row].tolist() == expect
    assert (w2r[rset.captions.index("a blue thing")] == -1).all()
    assert (w2r[rset.captions.index("a green triangle")] == -1).all()

    # Stored ids: used when the text tokenizes to them, skipped (not misaligned) when it does not.
    sample = next(s for s in rset.images if s.image_id == "10002456")
    text = sample.captions[0]
    for ids, annotated_words in ((tokenizer(text, add_special_tokens=False)["input_ids"], 6), ([7, 8, 9], 0)):
        sample.captions[0] = Caption(text, ids)
        out = ev.phrase_annotations(RetrievalSet.from_samples([sample]), collator)
        assert (0 if out is None else int((out >= 0).sum())) == annotated_words
    sample.captions[0] = text


def test_evaluation_reports_isda_on_annotated_data(annotated, tokenizer):
    torch.manual_seed(0)
    config = CrossModalConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        region_feature_dim=D, iais_layers=[0, -1], cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = CrossModalModel(config).eval()
    collator = ev.model_collator(tokenizer, model.config, max_text_len=24, max_regions=3)
    data = ev.build_eval_data(collator, str(annotated / "test"))
    assert data.word_to_region is not None
    report = ev.evaluate(model, data, batch_size=16, isd_alignments=["singular"])
    for layer in (0, 1):
        for d in ("L", "V"):
            entry = report["relations"][f"layer{layer}/isda_{d}"]
            assert entry["n"] == 3 and math.isfinite(entry["mean"])  # the three captions with aligned words
    assert "isda" not in report
    table = ev.markdown_table(report)
    assert "| layer1/isda_L |" in table and "ISDa (isda_L, isda_V)" in table and "not computed" not in table
