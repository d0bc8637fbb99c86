"""Selection: scores, top-k, budgets, subsets, save/load, and an end-to-end constructed case."""
import pytest
import torch
from torch import nn

from grft_serve.core.backbones import ModuleBackbone
from grft_train.config import SelectConfig
from grft_train.data import DataSplits, SampleSet, Source
from grft_train.objective import stratified_subsets as _subsets
from grft_train.select import (
    Selection,
    SelectionError,
    budget_to_k,
    eligible_modules,
    heatmap,
    run_select,
    select_from_grads,
    slice_scores,
    sparse_indices,
    topk_indices,
)


def test_row_and_column_scores_pick_biggest():
    g = torch.zeros(6, 5)
    g[4] = 3.0
    g[1, 0] = 10.0  # one huge entry beats a row of moderate ones: 100 > 45
    g[2] = 1.0
    assert topk_indices(slice_scores(g, "row"), 2).tolist() == [1, 4]
    assert slice_scores(g, "row")[4] == pytest.approx(45.0)
    gc = torch.zeros(3, 7)
    gc[:, 6] = 2.0
    gc[:, 2] = 1.0
    assert topk_indices(slice_scores(gc, "column"), 2).tolist() == [2, 6]
    conv = torch.zeros(4, 3, 2, 2)
    conv[3] = 1.0
    conv[:, 1] = 5.0
    assert topk_indices(slice_scores(conv, "row"), 1).tolist() == [3]  # 8*1 + 4*25 > 4*25
    assert topk_indices(slice_scores(conv, "column"), 1).tolist() == [1]
    # k larger than the matrix: clipped; ties resolved to lower indices deterministically
    assert topk_indices(torch.zeros(3), 5).tolist() == [0, 1, 2]
    assert topk_indices(torch.ones(4), 2).tolist() == [0, 1]


def test_sparse_topk_entries_per_row():
    g = torch.tensor([[0.0, 5.0, 1.0, -7.0], [2.0, 0.0, 0.0, 0.0]])
    s = sparse_indices(g, 2)
    assert s.shape == (2, 2) and s[0].tolist() == [1, 3] and 0 in s[1].tolist()


def test_budget_to_k():
    shapes = {"a": (10, 4), "b": (20, 4), "c": (5, 8)}
    total = 1000
    # k=3: a 12, b 12, c 24 -> 48 values; k=4: 64
    assert budget_to_k(shapes, "row", total, 0.05) == {"a": 3, "b": 3, "c": 3}
    assert budget_to_k(shapes, "row", total, 0.064) == {"a": 4, "b": 4, "c": 4}
    # k capped by the rows a matrix has
    assert budget_to_k(shapes, "row", total, 0.6)["c"] == 5
    # below one row each: single rows to the best score-per-parameter matrices
    scores = {"a": torch.tensor([1.0]), "b": torch.tensor([100.0]), "c": torch.tensor([8.0])}
    ks = budget_to_k(shapes, "row", total, 0.009, scores)
    assert ks == {"a": 1, "b": 1, "c": 0}
    # column mode counts column sizes (out)
    assert budget_to_k({"a": (10, 4)}, "column", 100, 0.2) == {"a": 2}


def test_select_from_grads_budget():
    grads = {"a": torch.randn(10, 4), "b": torch.randn(20, 4)}
    idx, scores = select_from_grads(grads, "row", 1, 0.1, 120)  # 12 values -> k=1 (8), k=2 -> 16 too many
    assert {n: len(i) for n, i in idx.items()} == {"a": 1, "b": 1}
    assert idx["b"].item() == int(scores["b"].argmax())


class _Pick(nn.Module):
    """features = fc2(relu(fc1(x))[:, rows]) : only rows `rows` of fc1 can get a gradient."""

    def __init__(self, rows=(2, 5)):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(len(rows), 4)
        self.rows = list(rows)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))[:, self.rows])


def _tensor_splits(n=24, d=6, seed=0, cols=None):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, d, generator=g) + y[:, None].float()
    if cols is not None:
        mask = torch.zeros(d)
        mask[cols] = 1
        x = x * mask
    src = Source(lambda i: x[i], [str(int(v)) for v in y], "tensor", "mem")
    ds = SampleSet(src, list(range(n)), y.tolist(), ["0", "1", "2"])
    return DataSplits(ds, ds.subset([]), ds.subset([]), ["0", "1", "2"], "tensor")


def test_selection_picks_rows_with_gradient(tmp_path):
    torch.manual_seed(0)
    bb = ModuleBackbone(_Pick(), "pick", 4)
    bb.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    cfg = SelectConfig(out=str(tmp_path / "sel.safetensors"), k=2, batch_size=12, progress=False, device="cpu")
    sel = run_select(cfg, backbone=bb, splits=_tensor_splits())
    assert sel.indices["net.fc1"].tolist() == [2, 5]
    assert sel.scores["net.fc1"][[0, 1, 3, 4, 6, 7]].abs().sum() == 0
    # the frozen weights were not touched and are frozen again
    for k, v in bb.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(p.requires_grad for p in bb.parameters())
    assert (tmp_path / "sel.png").is_file()
    assert heatmap(sel, bb.describe(), tmp_path / "again.png").stat().st_size > 1000  # errors not swallowed
    loaded = Selection.load(tmp_path / "sel.safetensors")
    assert loaded.mode == "row" and loaded.meta["base_fingerprint"] == bb.describe().fingerprint
    assert {n: i.tolist() for n, i in loaded.indices.items()} == {n: i.tolist() for n, i in sel.indices.items()}
    assert loaded.indices["net.fc1"].dtype == torch.int64


def test_column_selection_picks_used_inputs(tmp_path):
    torch.manual_seed(0)
    bb = ModuleBackbone(_Pick(rows=range(8)), "pick", 4).eval().requires_grad_(False)
    cfg = SelectConfig(out=str(tmp_path / "c.safetensors"), mode="column", k=2, batch_size=12, progress=False,
                       device="cpu", heatmap=False)
    sel = run_select(cfg, backbone=bb, splits=_tensor_splits(cols=[1, 3]))
    assert sel.indices["net.fc1"].tolist() == [1, 3]


def test_subsets_deterministic_and_lowest_loss_chosen(tmp_path):
    sp = _tensor_splits(n=30)
    a = _subsets(sp.train, 3, seed=1)
    b = _subsets(sp.train, 3, seed=1)
    assert [s.positions for s in a] == [s.positions for s in b]
    assert sorted(p for s in a for p in s.positions) == list(range(30))
    assert [s.positions for s in _subsets(sp.train, 3, seed=2)] != [s.positions for s in a]
    torch.manual_seed(0)
    bb = ModuleBackbone(_Pick(), "pick", 4).eval().requires_grad_(False)
    cfg = SelectConfig(out=str(tmp_path / "s.safetensors"), k=1, subsets=3, batch_size=8, progress=False,
                       device="cpu", heatmap=False, seed=1)
    s1 = run_select(cfg, backbone=bb, splits=sp)
    s2 = run_select(cfg, backbone=bb, splits=sp)
    losses = s1.meta["subset_losses"]
    assert len(losses) == 3 and s1.meta["chosen_subset"] == min(range(3), key=losses.__getitem__)
    assert losses == s2.meta["subset_losses"]
    assert {n: i.tolist() for n, i in s1.indices.items()} == {n: i.tolist() for n, i in s2.indices.items()}


def test_eligible_modules_rules():
    import timm

    from grft_serve.core.backbones import TimmBackbone

    bb = TimmBackbone("test_vit", model=timm.create_model("test_vit", num_classes=5,
                                                          img_size=32, patch_size=8))
    names = [n for n, _ in eligible_modules(bb)]
    assert "net.patch_embed.proj" in names and "net.head" not in names
    names2 = [n for n, _ in eligible_modules(bb, include_patch_embed=False, exclude=[r"\.mlp\."])]
    assert "net.patch_embed.proj" not in names2 and not any(".mlp." in n for n in names2)
    with pytest.raises(SelectionError):
        eligible_modules(bb, include=["nothing-matches"])


def test_layers_and_regularised_set_per_layout():
    from grft_train.layers import block_key, describe_regularised, layers_of, regularised_modules

    vit = ["net.patch_embed.proj"] + [f"net.blocks.{b}.{m}" for b in range(4) for m in ("attn.qkv", "mlp.fc2")]
    assert regularised_modules(vit, vit, 2, True) == ["net.patch_embed.proj", "net.blocks.2.attn.qkv",
                                                      "net.blocks.2.mlp.fc2", "net.blocks.3.attn.qkv",
                                                      "net.blocks.3.mlp.fc2"]
    assert regularised_modules(vit, vit, 1, False) == ["net.blocks.3.attn.qkv", "net.blocks.3.mlp.fc2"]
    assert regularised_modules(vit, vit, 0, False) == []
    assert regularised_modules(vit, vit, -1, False) == vit
    # EfficientNet: every MBConv block is a layer (not each of the 7 stages); conv_head is the last layer
    cnn = (["net.conv_stem"] + [f"net.blocks.{s}.{b}.conv_pw" for s in range(3) for b in range(2)]
           + ["net.conv_head"])
    assert block_key("net.blocks.2.1.conv_pw") == (2, 1)
    lay = layers_of(cnn)
    assert lay.stem == ["net.conv_stem"] and lay.final == ["net.conv_head"] and len(lay.blocks) == 6
    assert regularised_modules(cnn, cnn, 2, True) == ["net.conv_stem", "net.blocks.2.1.conv_pw", "net.conv_head"]
    # LLaMA: decoder layers; the token embedding is not patchable, so there is no stem
    llama = [f"net.layers.{b}.{m}" for b in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert regularised_modules(llama, llama, 1, True) == ["net.layers.2.self_attn.q_proj", "net.layers.2.mlp.down_proj"]
    d = describe_regularised(llama, 1, True)
    assert d["layers"] == ["block 2", "head"] and d["modules"] == 2 and d["layers_total"] == 3
    assert describe_regularised(cnn, 2, True)["layers"] == ["stem", "block 2.1", "final", "head"]


def test_select_full_pass_by_default(tmp_path):
    torch.manual_seed(0)
    bb = ModuleBackbone(_Pick(), "pick", 4).eval().requires_grad_(False)
    sp = _tensor_splits(n=30)
    cfg = SelectConfig(out=str(tmp_path / "s.safetensors"), k=1, batch_size=8, progress=False, device="cpu",
                       heatmap=False)
    sel = run_select(cfg, backbone=bb, splits=sp)
    assert sel.meta["grads"]["batches"] == 4 and sel.meta["grads"]["samples"] == 30  # one full pass
    capped = run_select(cfg.model_copy(update={"num_batches": 2}), backbone=bb, splits=sp)
    assert capped.meta["grads"]["batches"] == 2
