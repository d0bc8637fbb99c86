"""GRFT for generation (objective causal_lm) on a tiny random LLaMA with SmolLM2's tokenizer: the loss
covers answer tokens only, selection follows that loss's gradients, a fit moves only the selected rows
and biases, the package round-trips and `generate` equals decoding with the rows merged into the
weights, token for token."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gen_fixtures import make_tiny_lm
from torch import nn

from grft_serve.core.backbones import CausalLMBackbone
from grft_serve.core.generation import GenerationMeta, prompt_ids
from grft_serve.core.package import load_package
from grft_serve.core.rowop import ROW
from grft_train.causal import IGNORE, collate, response_ce, tokenize
from grft_train.config import FitConfig, SelectConfig
from grft_train.context import RunContext
from grft_train.fit import run_fit
from grft_train.gendata import Example, load_examples
from grft_train.generate import generate_ids, generate_text
from grft_train.select import run_select, slice_scores, topk_indices

RECORDS = [{"prompt": f"What is {a} + {b}?", "completion": str(a + b)} for a in range(6) for b in range(7)]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("gen") / "add.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return p


def common(lm_dir, data, **kw):
    return dict(backbone={"type": "causal_lm", "path": str(lm_dir), "max_length": 48}, objective="causal_lm",
                data={"format": "jsonl", "path": str(data), "val_fraction": 0.15, "test_fraction": 0.15},
                generation={"prompt_template": "Q: {prompt}\nA: ", "stop": ["\n"]}, batch_size=8, device="cpu",
                progress=False, **kw)


@pytest.fixture(scope="module")
def trained(lm_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    bb = CausalLMBackbone(lm_dir, max_length=48).eval().requires_grad_(False)
    pristine = copy.deepcopy(bb.state_dict())
    c = common(lm_dir, data)
    ctx = RunContext.build(SelectConfig(**c), backbone=bb)
    sel = run_select(SelectConfig(**c, out=str(out / "sel.safetensors"), k=2, heatmap=False), ctx)
    fcfg = FitConfig(**c, selection=str(out / "sel.safetensors"), out_dir=str(out), task_id="add", epochs=2,
                     lr=0.05, l2_lambda=1e-4)
    res = run_fit(fcfg, ctx, selection=sel)
    res.model.close()
    return dict(bb=bb, ctx=ctx, sel=sel, res=res, pristine=pristine, out=out)


def test_answer_tokens_only_carry_the_loss(lm_dir):
    bb = CausalLMBackbone(lm_dir, max_length=48).eval()
    meta = GenerationMeta(prompt_template="Q: {prompt}\nA: ", eos_token_ids=[2])
    exs = [Example("f:1", prompt="What is 2 + 3?", completion="5"), Example("f:2", prompt="Hi", completion="a b c")]
    items, cut = tokenize(exs, meta, bb.tokenizer, 48)
    assert cut == 0 and items[0].prompt_len == len(prompt_ids(meta, bb.tokenizer, "What is 2 + 3?"))
    batch, labels = collate(items, pad_id=0)
    for i, t in enumerate(items):  # prompt and padding are -100; the answer (+ EOS) is labelled by itself
        assert (labels[i, :t.prompt_len] == IGNORE).all() and (labels[i, len(t.ids):] == IGNORE).all()
        assert labels[i, t.prompt_len:len(t.ids)].tolist() == t.ids[t.prompt_len:] and t.ids[-1] == 2
    with torch.no_grad():
        ce, n, _ = response_ce(bb, batch, labels)
        logits = bb.lm(**batch).logits[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert n == sum(len(t.ids) - t.prompt_len for t in items) and torch.allclose(ce, want, atol=1e-5)
    # changing a prompt token changes the loss only through the answer's context, never as a target
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))
    assert not torch.allclose(ce, full)


def test_selection_follows_the_answer_loss_gradients(trained):
    """The scores are the squared gradients of the answer-token CE summed over one pass, per row."""
    ctx, sel = trained["ctx"], trained["sel"]
    assert sel.meta["objective"] == "causal_lm" and sel.meta["grads"]["samples"] == len(ctx.splits.train)
    assert not any("lm_head" in n or "embed" in n for n in sel.indices)
    bb = ctx.backbone
    name = "net.layers.1.mlp.down_proj"
    w = bb.get_submodule(name).weight
    w.requires_grad_(True)
    try:
        # one pass in select's batch order (its seed), batch means summed
        for batch, labels in ctx.objective.grad_batches(ctx.splits.train, 8, np.random.default_rng(0)):
            response_ce(bb, batch, labels)[0].backward()
        grad = w.grad.clone()
    finally:
        w.requires_grad_(False)
        w.grad = None
    scores = slice_scores(grad, "row")
    assert torch.allclose(sel.scores[name], scores, rtol=1e-3, atol=1e-9)
    assert sel.indices[name].tolist() == topk_indices(scores, 2).tolist()
    assert scores[sel.indices[name]].min() > scores.median()


def test_fit_moves_only_selected_rows_and_biases(trained):
    res, sel, bb = trained["res"], trained["sel"], trained["bb"]
    m = res.metrics
    assert m["objective"] == "causal_lm" and m["head_params"] == 0 and m["steps"] > 0
    assert m["test_exact_match"] is not None and 0 <= m["test_rouge_l"] <= 1 and m["test_ppl"] > 1
    # the frozen base is bit-identical and frozen
    assert all(torch.equal(v, trained["pristine"][k]) for k, v in bb.state_dict().items())
    assert not any(p.requires_grad for p in bb.parameters())
    pkg = load_package(res.package_path, base=bb.describe())
    trainable = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("values.", "biases.")) for n in trainable)
    for name, d in pkg.deltas.items():
        W = bb.get_submodule(name).weight
        assert d.indices.tolist() == sel.indices.get(name, torch.zeros(0)).tolist()
        assert d.values.shape == (len(d.indices), W.shape[1]) and d.bias.shape == (W.shape[0],)
        if len(d.indices):
            assert not torch.allclose(d.values, W[d.indices])  # the selected rows moved
    assert any(d.bias.abs().sum() > 0 for d in pkg.deltas.values())  # zero-initialised biases moved


def _merged_lm(bb: CausalLMBackbone, pkg) -> nn.Module:
    lm = copy.deepcopy(bb.lm)
    mods = dict(lm.named_modules())
    with torch.no_grad():
        for name, d in pkg.deltas.items():
            mod = mods[name.replace("net.", "model.", 1)]
            assert d.mode == ROW
            mod.weight.index_copy_(0, d.indices, d.values)
            mod.bias = nn.Parameter(d.bias.clone(), requires_grad=False)
    return lm


def test_package_round_trip_and_generate_equals_merged_weights(trained):
    bb, path = trained["bb"], trained["res"].package_path
    pkg = load_package(path, base=bb.describe())
    m = pkg.meta
    assert m.kind == "generation" and pkg.head_weight is None and m.labels == []
    assert m.preprocessing == {"kind": "text", "max_length": 48}
    g = m.generation
    assert (g.format, g.prompt_template, g.stop, g.eos_token_ids) == ("completion", "Q: {prompt}\nA: ", ["\n"], [2])
    assert g.temperature == 0 and 16 <= g.max_new_tokens <= 512
    prompts = ["What is 4 + 4?", "What is 0 + 6?", "Say hi"]
    got = generate_ids(path, bb, prompts, max_new_tokens=8)
    batched = generate_ids(path, bb, prompts, max_new_tokens=8, batch_size=3)
    lm = _merged_lm(bb, pkg)
    want = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(g, bb.tokenizer, p)])
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=2, pad_token_id=bb.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        want.append(out[:out.index(2)] if 2 in out else out)
    assert got == want and batched == want
    assert got != generate_ids(None, bb, prompts, max_new_tokens=8, meta=g)  # the task changes the answers
    texts = generate_text(path, bb, prompts, max_new_tokens=8)
    assert all("\n" not in t for t in texts)


def test_eval_reports_task_against_base(trained, lm_dir, data):
    from grft_train.config import EvalConfig
    from grft_train.evaluate import run_eval

    rep = run_eval(EvalConfig(**common(lm_dir, data), package=str(trained["res"].package_path)), trained["ctx"])
    assert rep["n"] == len(trained["ctx"].splits.test) and set(rep["task"]) >= {"exact_match", "rouge_l", "ppl", "loss"}
    assert rep["task"]["loss"] < rep["base"]["loss"]  # trained on this task: lower answer loss than the base
    assert rep["delta"]["loss"] == pytest.approx(rep["task"]["loss"] - rep["base"]["loss"])
    assert rep["samples"][0]["reference"] == trained["ctx"].splits.test[0].answer


def test_chat_records_train_on_the_assistant_turn(lm_dir, tmp_path):
    p = tmp_path / "chat.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"Add {a} and {a}"},
                          {"role": "assistant", "content": str(2 * a)}]}
            for a in range(8)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = common(lm_dir, p)
    c["data"].update(val_fraction=0.0, test_fraction=0.25)
    ctx = RunContext.build(SelectConfig(**c), summary=False)
    obj = ctx.objective
    assert obj.meta.format == "chat" and obj.meta.chat_template == ctx.backbone.tokenizer.chat_template
    t = obj.tokens(ctx.splits.train)[0]
    answer = ctx.backbone.tokenizer.decode(t.ids[t.prompt_len:])
    assert answer.startswith(ctx.splits.train[0].answer) and "Add" not in answer
    assert len(load_examples(c["data"]).test) == 2


def test_subsets_select_on_the_lowest_answer_loss(trained, lm_dir, data, tmp_path):
    c = common(lm_dir, data)
    sel = run_select(SelectConfig(**c, out=str(tmp_path / "s.safetensors"), k=1, subsets=2, heatmap=False),
                     trained["ctx"])
    losses = sel.meta["subset_losses"]
    assert len(losses) == 2 and sel.meta["chosen_subset"] == int(np.argmin(losses))
    n = len(trained["ctx"].splits.train)
    assert sel.meta["subset_size"] in (n // 2, n - n // 2) and sel.meta["grads"]["samples"] == sel.meta["subset_size"]
