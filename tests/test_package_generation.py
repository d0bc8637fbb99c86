"""The generation package contract: kind, no head, prompt rendering shared by training and serving."""
import pytest
import torch
from gen_fixtures import make_tiny_lm

from grft_serve.core import package as P
from grft_serve.core.backbones import CausalLMBackbone, HFTextBackbone
from grft_serve.core.generation import GenerationMeta, PromptError, chat_ids, example_ids, prompt_ids
from grft_serve.core.rowop import ROW, ModuleDelta


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def lm(lm_dir):
    return CausalLMBackbone(lm_dir, max_length=128)


def gen_package(bb, task_id="gen", k=2, **meta) -> P.TaskPackage:
    spec = bb.describe()
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for name, m in list(spec.modules.items())[:4]:
        idx = torch.arange(k)
        deltas[name] = ModuleDelta(ROW, idx, torch.randn(k, *m.weight_shape[1:], generator=g))
    fields = dict(task_id=task_id, kind="generation", base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                  mode="row", k=k, preprocessing=bb.preprocessing_meta(), generation=GenerationMeta(format="chat"))
    return P.TaskPackage(P.PackageMeta(**{**fields, **meta}), deltas, None, None)


def test_causal_lm_and_classification_body_share_modules_and_fingerprint(lm_dir, lm):
    body = HFTextBackbone(lm_dir, pooling="last")
    a, b = body.describe(), lm.describe()
    assert a.fingerprint == b.fingerprint and list(a.modules) == list(b.modules)
    assert not any("lm_head" in n for n in b.modules)  # tied to the embeddings: never patchable
    assert (a.task_kind, b.task_kind) == ("classification", "generation")


def test_generation_package_round_trip(lm, tmp_path):
    pkg = gen_package(lm)
    path = P.save_package(pkg, tmp_path / "gen.grft.safetensors")
    back = P.load_package(path, base=lm.describe())
    assert back.kind == "generation" and back.head_weight is None and back.meta.labels == []
    assert back.meta.generation == pkg.meta.generation
    assert set(back.deltas) == set(pkg.deltas) and back.num_params() == pkg.num_params()
    with pytest.raises(ValueError, match="no classifier head"):
        back.head()


def test_kind_mismatch_is_refused_both_ways(lm_dir, lm):
    body = HFTextBackbone(lm_dir, pooling="last")
    data = P.package_bytes(gen_package(lm))
    with pytest.raises(P.TaskKindMismatchError) as ei:
        P.load_package(data, base=body.describe())
    assert ei.value.status == 422 and ei.value.code == "task_kind_mismatch"
    spec = body.describe()
    cls_meta = P.PackageMeta(task_id="cls", base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                             mode="row", labels=["a", "b"])
    cls_pkg = P.TaskPackage(cls_meta, {}, torch.zeros(2, spec.feature_dim), torch.zeros(2))
    with pytest.raises(P.TaskKindMismatchError):
        P.load_package(P.package_bytes(cls_pkg), base=lm.describe())


def test_generation_metadata_and_tensors_are_checked(lm):
    pkg = gen_package(lm)
    with_head = P.TaskPackage(pkg.meta, pkg.deltas, torch.zeros(1, 64), torch.zeros(1))
    with pytest.raises(P.ShapeMismatchError, match="no classifier head"):
        P.load_package(P.package_bytes(with_head))
    for bad in ({"generation": None}, {"labels": ["x"]}):
        with pytest.raises(ValueError):
            gen_package(lm, **bad)
    with pytest.raises(P.EmptyPackageError):
        P.load_package(P.package_bytes(P.TaskPackage(pkg.meta, {}, None, None)))
    for bad in ({"prompt_template": "no slot"}, {"prompt_template": "{prompt}{prompt}"}, {"stop": ["x" * 65]},
                {"stop": ["a"] * 5}, {"temperature": 3.0}, {"top_p": 0.0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            GenerationMeta(**bad)


def test_prompt_rendering_is_one_function_for_training_and_serving(lm):
    tok = lm.tokenizer
    chat = GenerationMeta(format="chat")
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    ids, n = example_ids(chat, tok, messages=msgs)
    assert ids[:n] == chat_ids(chat, tok, msgs[:1])  # the served prompt is the trained prefix
    assert tok.decode(ids[n:]).startswith("4") and tok.eos_token_id in ids[n:]
    comp = GenerationMeta(prompt_template="Q: {prompt}\nA:")
    ids, n = example_ids(comp, tok, prompt="2+2?", completion=" 4")
    assert ids[:n] == prompt_ids(comp, tok, "2+2?") and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:n]) == "Q: 2+2?\nA:"
    with pytest.raises(PromptError, match="assistant"):
        example_ids(chat, tok, messages=msgs[:1])
    with pytest.raises(PromptError, match="completion"):
        example_ids(comp, tok, prompt="x", completion="")
    for bad in ([], [{"role": "user", "content": 3}], [{"role": "robot", "content": "x"}], "hi"):
        with pytest.raises(PromptError):
            chat_ids(chat, tok, bad)
