"""SCL loss (Khosla et al.) and the GPS view transform."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from grft_train.scl import dropout_mode, gps_transform, supcon_loss


def _reference(features, labels, t):
    """Straightforward loop implementation of L_out."""
    B, V, _ = features.shape
    z = F.normalize(features.double(), dim=-1).transpose(0, 1).reshape(B * V, -1)
    lab = labels.repeat(V)
    total, count = 0.0, 0
    for i in range(B * V):
        others = [a for a in range(B * V) if a != i]
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in others)
        pos = [p for p in others if lab[p] == lab[i]]
        if not pos:
            continue
        total += -sum(float(z[i] @ z[p]) / t - math.log(denom) for p in pos) / len(pos)
        count += 1
    return total / count


def test_known_value_orthogonal_views():
    # two classes, perfectly aligned views of orthogonal class directions
    f = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]]])
    y = torch.tensor([0, 1])
    t = 0.5  # (at 0.07 the value is ~1e-6, below float32 resolution of the shift-by-max form)
    # each anchor: positive sim 1, two negatives sim 0 -> -log(e^{1/t} / (e^{1/t} + 2))
    expect = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert supcon_loss(f, y, t).item() == pytest.approx(expect, rel=1e-5)


def test_matches_reference_random():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 2, 5, generator=g)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    assert supcon_loss(f, y, 0.5).item() == pytest.approx(_reference(f, y, 0.5), rel=1e-5)
    assert supcon_loss(f, y, 0.07).item() == pytest.approx(_reference(f, y, 0.07), rel=1e-4)


def test_anchor_without_positive_no_nan():
    f = torch.randn(4, 1, 8, requires_grad=True)  # one view: label 3 has no positive at all
    y = torch.tensor([0, 0, 1, 3])
    loss = supcon_loss(f, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    # single view and all-distinct labels: no anchor has a positive -> 0, still differentiable
    g = torch.randn(3, 1, 8, requires_grad=True)
    loss2 = supcon_loss(g, torch.tensor([0, 1, 2]))
    assert loss2.item() == 0.0
    loss2.backward()


def test_loss_lower_when_classes_cluster():
    y = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]).unsqueeze(1).repeat(1, 2, 1)
    bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]).unsqueeze(1).repeat(1, 2, 1)
    assert supcon_loss(good, y) < supcon_loss(bad, y)


def test_gps_transform_size_and_norm():
    tf = gps_transform({"input_size": (3, 40, 40), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                        "interpolation": "bicubic"})
    x = tf(Image.new("RGB", (28, 28), (255, 0, 0)))
    assert x.shape == (3, 40, 40)
    assert x.min() >= -1.0001 and x.max() <= 1.0001


def test_dropout_mode_keeps_batchnorm_eval():
    m = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)).eval()
    with dropout_mode(m):
        assert not m[0].training and m[1].training
        m(torch.randn(8, 4))
    assert not m[1].training
    assert torch.equal(m[0].running_mean, torch.zeros(4))


def test_has_active_dropout():
    from torch import nn

    from grft_train.scl import has_active_dropout

    assert has_active_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert not has_active_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))

    class WithConfig(nn.Module):  # transformers attention dropout lives in the config, not in a module
        def __init__(self, p):
            super().__init__()
            self.config = type("C", (), {"attention_dropout": p})()

    assert has_active_dropout(WithConfig(0.1)) and not has_active_dropout(WithConfig(0.0))


def test_span_deletion_keeps_ends_and_repads():
    from grft_train.scl import span_deletion

    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 10, 11, 12, 102], [101, 20, 21, 102, 0, 0, 0, 0, 0, 0],
                        [101, 30, 102, 0, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    g = torch.Generator().manual_seed(0)
    out = span_deletion({"input_ids": ids, "attention_mask": mask}, ratio=0.2, pad_id=0, generator=g)
    new_ids, new_mask = out["input_ids"], out["attention_mask"]
    assert new_ids.shape == new_mask.shape and new_ids.shape[1] == 8  # longest row lost 2 of 10 tokens
    assert new_mask.sum(1).tolist() == [8, 3, 3]  # ceil(0.2 n): 2 and 1; rows under 4 tokens untouched
    row0 = [t for t in new_ids[0].tolist()]
    assert row0[0] == 101 and row0[-1] == 102
    kept = [t for t in ids[0].tolist() if t in row0]
    assert kept == row0  # order preserved
    missing = [t for t in ids[0].tolist() if t not in row0]
    assert len(missing) == 2 and missing[1] - missing[0] == 1  # one contiguous span
    assert new_ids[1].tolist()[:3] in ([101, 21, 102], [101, 20, 102]) and new_ids[1, 3:].eq(0).all()
    assert new_ids[2, :3].tolist() == [101, 30, 102]


def test_text_views_differ_without_dropout():
    """A dropout-free text backbone (LLaMA-like) gets span-deletion views; with dropout, dropout views."""
    from torch import nn

    from grft_serve.core.backbones import Backbone
    from grft_train.scl import SCLViews

    class Bag(Backbone):
        kind = "text"
        feature_dim = 8

        def __init__(self, p):
            super().__init__()
            self.emb = nn.EmbeddingBag(50, 8, mode="sum")
            self.drop = nn.Dropout(p)

        def preprocess(self, raw, preprocessing=None):
            ids = torch.zeros(len(raw), 12, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(raw):
                toks = [1] + [2 + (ord(c) % 40) for c in r][:10] + [3]
                ids[i, :len(toks)] = torch.tensor(toks)
                mask[i, :len(toks)] = 1
            return {"input_ids": ids, "attention_mask": mask}

        def forward(self, batch):
            return self.drop(self.emb(batch["input_ids"], per_sample_weights=batch["attention_mask"].float()))

    torch.manual_seed(0)
    texts = ["abcdefghij", "klmnopqrst"]
    v = SCLViews(Bag(0.0).eval())
    assert v.method == "span"
    f = v.features(texts, "cpu")
    assert f.shape == (2, 2, 8) and not torch.allclose(f[:, 0], f[:, 1])
    v2 = SCLViews(Bag(0.5).eval())
    assert v2.method == "dropout"
