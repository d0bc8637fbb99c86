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
