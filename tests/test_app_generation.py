"""End-to-end generation over HTTP: the real app on 127.0.0.1, the official ``openai`` client, no mocks.

One app for the module: a tiny random LLaMA served as a generation backbone (``lm``) and a tiny BERT
as a classification backbone (``text``). Three generation tasks (rows, columns, rows + biases) are
registered through ``POST /v1/tasks`` like any package.
"""
from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import requests
import torch

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from app_fixtures import free_port, make_text_model, run_app, start_ray, text_cfg  # noqa: E402
from gen_fixtures import make_task, make_tiny_lm, merged_tokens  # noqa: E402
from grft_serve.core import package as P  # noqa: E402
from grft_serve.core.backbones import CausalLMBackbone  # noqa: E402
from grft_serve.core.generation import GenerationMeta, chat_ids, prompt_ids  # noqa: E402
from grft_serve.testing import random_package  # noqa: E402

ADMIN = "gen-admin-token"
pytestmark = pytest.mark.timeout(300)
CONTEXT = 1024


class Ctx:
    pass


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray
    from ray import serve

    os.environ["GRFT_GEN_ADMIN"] = ADMIN
    root = tmp_path_factory.mktemp("genapp")
    c = Ctx()
    c.lm_path = make_tiny_lm(root / "lm", initializer_range=0.3, max_position_embeddings=CONTEXT)
    c.text_path = make_text_model(root / "bert")
    port = free_port()
    config = {
        "store": {"path": str(root / "store")}, "admin_token_env": "GRFT_GEN_ADMIN", "sync_interval_s": 1.0,
        "task_cache_ttl_s": 0.0, "limits": {"max_package_bytes": 4_000_000, "max_choices": 4},
        "backbones": [
            {"name": "lm", "backbone": {"type": "causal_lm", "path": str(c.lm_path), "max_length": CONTEXT},
             "device": "cpu", "num_cpus": 0.25, "generation": {"max_tasks_per_batch": 4, "max_requests": 8,
                                                                "max_batch_tokens": 256, "page_size": 32}},
            {"name": "text", "backbone": text_cfg(c.text_path), "device": "cpu", "num_cpus": 0.25},
        ],
        "ingress_num_cpus": 0.1,
    }
    start_ray()
    c.url = run_app(config, port)
    c.bb = CausalLMBackbone(c.lm_path, max_length=CONTEXT)
    c.ref = copy.deepcopy(c.bb)
    c.tok = c.bb.tokenizer
    c.tasks = {t.task_id: t for t in [make_task(c.bb, "gen-row", 1, max_new_tokens=8),
                                        make_task(c.bb, "gen-col", 2, mode="column", max_new_tokens=8),
                                        make_task(c.bb, "gen-bias", 3, bias=True, max_new_tokens=8, fmt="completion")]}
    for t in c.tasks.values():
        r = register(c, P.package_bytes(t))
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "generation" and r.json()["backbone"] == "lm"
    c.client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()


def register(c, data: bytes):
    return requests.post(f"{c.url}/v1/tasks", files={"file": ("t.grft.safetensors", data)},
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def expected_text(c, task, prompt=None, messages=None, n=8) -> str:
    meta = c.tasks[task].meta.generation if task else c.bb.generation_defaults()
    ids = chat_ids(meta, c.tok, messages) if messages is not None else prompt_ids(meta, c.tok, prompt)
    toks = merged_tokens(c.ref, c.tasks.get(task), ids, n, eos=meta.eos_ids(c.tok))
    return c.tok.decode(toks, skip_special_tokens=True)


def test_models_lists_bases_and_generation_tasks_with_their_parent(app):
    models = {m.id: m for m in app.client.models.list()}
    assert "lm" in models and "text" not in models  # only generation bases
    assert {t: models[t].parent for t in app.tasks} == {t: "lm" for t in app.tasks}


def test_mixed_tasks_and_base_over_http_equal_merged_weights(app):
    """Concurrent greedy requests (3 tasks + the base) share the decode loop; each answer equals its
    task merged into the weights, token for token."""
    msgs = [{"role": "user", "content": "Name three colours."}]
    jobs = [(t, "chat") for t in app.tasks] + [(None, "chat"), ("gen-bias", "completion")]
    out: dict = {}

    def run(i, task, how):
        model = task or "lm"
        if how == "chat":
            r = app.client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
            out[i] = (r.choices[0].message.content, r)
        else:
            r = app.client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
            out[i] = (r.choices[0].text, r)
    threads = [threading.Thread(target=run, args=(i, t, h)) for i, (t, h) in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    texts = [out[i][0] for i in range(len(jobs))]
    assert len(set(texts)) == len(texts)  # each task answers differently
    for i, (task, how) in enumerate(jobs):
        want = expected_text(app, task, messages=msgs) if how == "chat" else \
            expected_text(app, task, prompt="Once upon a time")
        assert texts[i] == want, (task, how)
        r = out[i][1]
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
        assert r.choices[0].finish_reason in ("stop", "length")
    assert app.client.chat.completions.create(model="lm:gen-row", messages=msgs, max_tokens=8,
                                              temperature=0).choices[0].message.content == texts[0]


def test_streaming_chat_and_completion_match_the_full_answer(app):
    msgs = [{"role": "user", "content": "Say something."}]
    full = app.client.chat.completions.create(model="gen-col", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(app.client.chat.completions.create(model="gen-col", messages=msgs, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices
    comp = list(app.client.completions.create(model="gen-bias", prompt="Hello", max_tokens=6, temperature=0,
                                              stream=True))
    ref = app.client.completions.create(model="gen-bias", prompt="Hello", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in comp) == ref.choices[0].text
    raw = requests.post(f"{app.url}/v1/completions", json={"model": "gen-bias", "prompt": "Hi", "max_tokens": 3,
                                                            "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_n_choices_seeds_and_stop(app):
    r = app.client.completions.create(model="gen-row", prompt=["a", "b"], n=2, max_tokens=6, temperature=1.0,
                                      seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    again = app.client.completions.create(model="gen-row", prompt=["a", "b"], n=2, max_tokens=6, temperature=1.0,
                                          seed=5)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: repeatable
    greedy = app.client.completions.create(model="gen-row", prompt="Tell me", max_tokens=12, temperature=0)
    full = greedy.choices[0].text
    stop = full[4:7]
    cut = app.client.completions.create(model="gen-row", prompt="Tell me", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,status,code", [
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "gen-row", "prompt": "x", "temperature": 3}, 400, "invalid_request"),
    ({"model": "gen-row", "prompt": "x", "top_p": 0}, 400, "invalid_request"),
    ({"model": "gen-row", "prompt": "x", "n": 9}, 400, "invalid_request"),
    ({"model": "gen-row", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request"),
    ({"model": "gen-row", "prompt": "x", "max_tokens": CONTEXT}, 400, "context_length_exceeded"),
    ({"model": "gen-row", "prompt": "word " * (CONTEXT + 10)}, 400, "context_length_exceeded"),
    ({"model": "gen-row", "prompt": "x", "logprobs": 2}, 400, "invalid_request"),
    ({"model": "gen-row", "prompt": 7}, 400, "invalid_request"),
    ({"model": "gen-row", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request"),
])
def test_bad_requests_get_openai_errors(app, body, status, code):
    path = "chat/completions" if "messages" in body else "completions"
    r = requests.post(f"{app.url}/v1/{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_openai_client_raises_the_right_errors(app):
    with pytest.raises(openai.NotFoundError):
        app.client.completions.create(model="missing-task", prompt="x")
    with pytest.raises(openai.BadRequestError) as ei:
        app.client.chat.completions.create(model="gen-row", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=CONTEXT * 2)
    assert ei.value.code == "context_length_exceeded"


def test_task_kinds_are_kept_apart(app):
    # a classification task on the text backbone is not a generation model, and a generation task has no head
    from grft_serve.core.backbones import load_backbone

    cls = random_package(load_backbone(text_cfg(app.text_path)), "cls-task", k=1)
    assert register(app, P.package_bytes(cls)).status_code == 201
    r = requests.post(f"{app.url}/v1/completions", json={"model": "cls-task", "prompt": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"
    r = requests.post(f"{app.url}/v1/tasks/gen-row/predict", json={"inputs": ["x"]}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "task_kind_mismatch"
    # a classification package for the LLaMA's base goes nowhere: its backbone here generates
    spec = app.bb.describe()
    meta = P.PackageMeta(task_id="cls-on-lm", base_model_id=spec.model_id, base_fingerprint=spec.fingerprint,
                         mode="row", labels=["a", "b"])
    bad = P.TaskPackage(meta, {}, torch.zeros(2, spec.feature_dim), torch.zeros(2))
    r = register(app, P.package_bytes(bad))
    assert r.status_code == 422 and r.json()["error"]["code"] == "task_kind_mismatch"


def test_client_disconnect_cancels_the_sequence(app):
    import httpx

    def stats():
        bbs = requests.get(f"{app.url}/v1/backbones", timeout=30).json()["backbones"]
        return next(b for b in bbs if b["name"] == "lm")["stats"]["generation"]
    before = stats().get("decode_cancelled", 0)
    body = {"model": "gen-row", "prompt": "Write forever", "max_tokens": CONTEXT - 20, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{app.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first chunk arrived: the sequence is decoding
    deadline = time.time() + 30
    while time.time() < deadline:
        s = stats()
        if s.get("decode_cancelled", 0) > before and s["pending"] == 0:
            break
        time.sleep(0.2)
    assert s.get("decode_cancelled", 0) > before and s["pending"] == 0
    # and the loop serves the next caller
    assert app.client.completions.create(model="gen-row", prompt="ok", max_tokens=3).choices[0].text is not None
