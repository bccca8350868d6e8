"""Retrieval and relation-swap metrics on hand-made score matrices with known answers."""

import pytest
import torch

from iais_scale.evaluate import markdown_table, retrieval_metrics, winoground_scores


def test_perfect_scores_give_full_recall():
    # 3 images, 2 captions each; each caption scores highest with its own image.
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.full((3, 6), -1.0)
    scores[owner, torch.arange(6)] = 1.0
    m = retrieval_metrics(scores, owner)
    assert all(m[k] == 100.0 for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"))
    assert m["rsum"] == 600.0


def test_known_ranks():
    # 4 images, 1 caption each (caption c belongs to image c). Columns are captions.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0],  # image 0
            [0.5, 0.2, 0.7, 0.3],  # image 1
            [0.1, 0.6, 0.6, 0.2],  # image 2
            [0.3, 0.9, 0.1, 0.4],  # image 3
        ]
    )
    owner = torch.arange(4)
    m = retrieval_metrics(scores, owner)
    # IR (per caption, rank its image among images):
    # c0: own 0.9 best -> rank 0; c1: own 0.2, wrong >= : 0.6, 0.9 -> rank 2;
    # c2: own 0.6, wrong >= : 0.8, 0.7 -> rank 2; c3: own 0.4 best -> rank 0.
    assert m["ir_r1"] == pytest.approx(50.0)
    assert m["ir_r5"] == pytest.approx(100.0)
    # TR (per image, rank its caption among captions):
    # i0: 0.9 best -> 0; i1: own 0.2, wrong >= : 0.5, 0.7, 0.3 -> 3;
    # i2: own 0.6, wrong >= : 0.6 (tie counts against) -> 1; i3: own 0.4, wrong >= : 0.9 -> 1.
    assert m["tr_r1"] == pytest.approx(25.0)
    assert m["tr_r5"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(25 + 100 + 100 + 50 + 100 + 100)


def test_text_retrieval_uses_the_best_of_several_captions():
    # Image 0 owns captions 0 and 1; caption 1 scores top for it, caption 0 low.
    owner = torch.tensor([0, 0, 1])
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.0, 0.0, 0.8]])
    m = retrieval_metrics(scores, owner)
    assert m["tr_r1"] == 100.0  # image 0: best own caption 0.9 beats the wrong 0.5
    # IR: caption 0 (own 0.1 vs image 1's 0.0) correct; caption 1 correct; caption 2 correct.
    assert m["ir_r1"] == 100.0


def test_ties_count_against_the_query():
    owner = torch.tensor([0, 1])
    m = retrieval_metrics(torch.zeros(2, 2), owner)  # a constant scorer
    assert m["tr_r1"] == 0.0 and m["ir_r1"] == 0.0
    assert m["tr_r5"] == 100.0 and m["ir_r5"] == 100.0  # rank 1 of 2 is within 5


def test_missing_or_bad_ids_are_rejected():
    scores = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(scores, torch.tensor([0, 0, 1]))  # image 2 has no caption
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(scores, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(scores, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(scores, torch.tensor([0, 1]))


def test_winoground_scores():
    # s[g, i, j] = score(caption i, image j)
    s = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],  # all correct
            [[1.0, 0.5], [0.8, 0.9]],  # text: 1>0.8 and 0.9>0.5 yes; image: 1>0.5, 0.9>0.8 yes
            [[1.0, 2.0], [0.0, 3.0]],  # text: 1>0, 3>2 yes; image: 1>2 no
            [[0.0, 1.0], [1.0, 0.0]],  # all wrong
        ]
    )
    w = winoground_scores(s)
    assert w == {"text": 75.0, "image": 50.0, "group": 50.0}
    with pytest.raises(ValueError):
        winoground_scores(torch.zeros(3, 2))


def test_markdown_table_lists_the_metrics():
    owner = torch.arange(2)
    report = {"images": 2, "captions": 2, "pairs_scored": 4, "pairs_per_second": 10.0}
    report.update(retrieval_metrics(torch.eye(2), owner))
    report["relations"] = {"layer3/isd_L/singular": {"mean": 0.5, "p10": 0.1, "p90": 0.9}}
    report["relation_swap"] = {"groups": 3, "text": 10.0, "image": 20.0, "group": 5.0}
    table = markdown_table(report)
    assert "| 100.00 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 | 600.00 |" in table
    assert "layer3/isd_L/singular | 0.5000" in table
    assert "group 5.0" in table


def test_ir_recall_as_the_authors_count_it_adds_the_first_k_captions_hits_again():
    """By hand: 4 captions, 2 images. Captions 0 and 2 rank their image first, caption 1 second,
    caption 3 second. Correct IR@1 = 2/4. The authors' count: every hit adds (rank < k) and
    (caption row < k): R@1 = [cap 0: 1 + 1] + [cap 2: 1 + 0] = 3 of 4; R@5 = R@10 = 2 per hit = 8/4."""
    from iais_scale.evaluate import authors_ir_recall

    owner = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([[0.9, 0.2, 0.1, 0.8],   # image 0
                           [0.1, 0.7, 0.6, 0.3]])  # image 1
    assert retrieval_metrics(scores, owner)["ir_r1"] == 50.0
    assert authors_ir_recall(scores, owner) == {"ir_r1": 75.0, "ir_r5": 200.0, "ir_r10": 200.0}
