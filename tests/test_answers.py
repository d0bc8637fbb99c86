"""Answers: the replica's side of ``Engine.run`` (logits + versions → labels, scores, top-k), and the
reference ``predict`` over an engine (each task's own preprocessing)."""
import math

import pytest
import torch

from grft_serve.app.answers import answers, first_non_finite, predict
from grft_serve.engine import Engine
from grft_serve.testing import random_package, reference_forward


def test_answers_from_logits_and_non_finite_scores():
    logits = [torch.tensor([0.0, 2.0, 1.0]), torch.tensor([3.0, -1.0]), torch.tensor([1.0, float("inf")])]
    labels = {"a": ["x", "y", "z"], "b": ["no", "yes"]}
    out = answers(logits, ["a", "b", "b"], ["va", "vb", "vb"], labels, top_k=2)
    assert [(o["task"], o["version"]) for o in out] == [("a", "va"), ("b", "vb"), ("b", "vb")]
    assert [o["label"] for o in out[:2]] == ["y", "no"]
    p = logits[0].softmax(-1)
    assert [t["label"] for t in out[0]["top_k"]] == ["y", "z"]
    assert out[0]["score"] == pytest.approx(float(p[1])) and out[0]["top_k"][1]["score"] == pytest.approx(float(p[2]))
    assert len(out[1]["top_k"]) == 2 and len(answers(logits[:1], ["a"], ["va"], labels, top_k=9)[0]["top_k"]) == 3
    assert first_non_finite(out[:2]) is None and first_non_finite(out) == 2 and math.isnan(out[2]["score"])


def test_predict_formats_answers(vit):
    from PIL import Image

    eng = Engine(vit)
    p = random_package(vit, "img", k=2, n_labels=4)
    eng.register(p)
    imgs = [Image.new("RGB", (40, 30), (i * 40, 100, 200)) for i in range(3)]
    out = predict(eng, imgs, ["img"] * 3, top_k=2)
    assert len(out) == 3
    for o in out:
        assert o["label"] in p.meta.labels and 0 < o["score"] <= 1
        assert len(o["top_k"]) == 2 and o["top_k"][0]["label"] == o["label"]
        assert o["version"] == eng.task("img").version



def test_predict_uses_each_tasks_preprocessing(cnn):
    """Tasks trained at different input sizes on one CNN are each served at their own size."""
    from PIL import Image

    from grft_serve.core.package import PreprocessingMismatchError

    small = random_package(cnn, "small", k=1, seed=1)
    big = random_package(cnn, "big", k=1, seed=2)
    for pkg, size in ((small, 32), (big, 48)):
        pkg.meta.preprocessing = cnn.preprocessing_meta(input_size=size)
    eng = Engine(cnn)
    eng.register(small)
    eng.register(big)
    imgs = [Image.new("RGB", (50, 40), (30 * i, 90, 160)) for i in range(4)]
    ids = ["small", "big", "small", "big"]
    got = predict(eng, imgs, ids, top_k=3)
    for i, (img, tid) in enumerate(zip(imgs, ids)):
        pkg = small if tid == "small" else big
        x = cnn.preprocess([img], pkg.meta.preprocessing)
        assert x.shape[-1] == (32 if tid == "small" else 48)
        ref = reference_forward(cnn, pkg, x)[0].softmax(-1)
        assert abs(got[i]["score"] - float(ref.max())) < 1e-5
    text = random_package(cnn, "text", k=1, seed=3)
    text.meta.preprocessing = {"kind": "text", "pooling": "mean"}
    with pytest.raises(PreprocessingMismatchError, match="text inputs"):
        eng.register(text)
    assert {t.task_id for t in eng.tasks()} == {"small", "big"}
