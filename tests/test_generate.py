"""The decode loops (engine.generate): mixed-task generation equals merged weights token for token,
per-request sampling / stop / length rules, admission limits, cancellation and failure isolation."""
import copy
import threading
import time

import pytest
import torch
from gen_fixtures import make_task, make_tiny_lm, merged_tokens

from grft_serve.core import package as P
from grft_serve.core.backbones import CausalLMBackbone
from grft_serve.engine import Engine, GenerationInputError, SamplingParams, TextGenerator
from grft_serve.engine.decode_slots import slot_key

N = 10
QUESTIONS = ["What is the capital of France?", "Name a fruit."]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    # a larger init than the default makes a random model's greedy tokens depend on its input and weights
    return make_tiny_lm(tmp_path_factory.mktemp("gen_lm"), initializer_range=0.3)


@pytest.fixture(scope="module")
def setup(lm_dir):
    torch.set_num_threads(1)
    bb = CausalLMBackbone(lm_dir, max_length=128)
    ref = copy.deepcopy(bb)
    tasks = [make_task(bb, "t0", 1, max_new_tokens=N), make_task(bb, "t1", 2, mode="column", max_new_tokens=N),
             make_task(bb, "t2", 3, bias=True, max_new_tokens=N)]
    eng = Engine(bb, device="cpu")
    for t in tasks:
        eng.register(P.package_bytes(t))
    return eng, ref, {t.task_id: t for t in tasks}


class Collector:
    """A request's sink: every event, and a flag once it is finished."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish(self):
        return self.events[-1].finish_reason if self.done.is_set() else None


def start(gen, tid, q, **kw):
    ids = gen.render(tid, messages=[{"role": "user", "content": q}])
    params = gen.params(tid, len(ids), **{"max_tokens": N, **kw})
    c = Collector()
    return ids, gen.submit(tid, ids, params, c), c


def no_eos(gen, tid, ids, **kw):
    p = gen.params(tid, len(ids), **{"max_tokens": N, **kw})
    return SamplingParams(**{**p.__dict__, "eos_ids": ()})


@pytest.mark.parametrize("decoder", ["continuous", "padded"])
def test_mixed_tasks_and_base_equal_merged_weights_token_for_token(setup, decoder):
    eng, ref, pkgs = setup
    gen = TextGenerator(eng, decoder, max_tasks_per_batch=4, max_requests=16, max_batch_tokens=256, page_size=32)
    try:
        jobs = []
        for tid in ["t0", "t1", "t2", None]:
            for q in QUESTIONS:
                ids = gen.render(tid, messages=[{"role": "user", "content": q}])
                c = Collector()
                jobs.append((tid, ids, gen.submit(tid, ids, no_eos(gen, tid, ids), c), c))
        for *_, c in jobs:
            assert c.done.wait(120)
        outs = [r.tokens for _, _, r, _ in jobs]
        assert len({tuple(o) for o in outs}) == len(outs)  # the tasks really change the answers
        for tid, ids, r, c in jobs:
            assert r.tokens == merged_tokens(ref, pkgs.get(tid), ids, N), (decoder, tid)
            assert c.finish == "length" and c.events[-1].completion_tokens == N
        assert gen.stats()["decode_slot_loads"] <= 3
    finally:
        gen.close()


def test_steady_decode_steps_reuse_plans_and_gathers_with_the_same_tokens(setup):
    eng, _, _ = setup
    outs, reused = {}, {}
    for keep in (0, None):  # 0: plans and gathers made afresh every step (the reference)
        gen = TextGenerator(eng, "continuous", max_tasks_per_batch=4, max_requests=16, max_batch_tokens=256,
                            page_size=32)
        if keep is not None:
            gen.slots.keep_bytes = keep
        try:
            jobs = []
            for tid in ["t0", "t1", "t2", None]:  # rows, columns, bias and the empty slot
                for q in QUESTIONS:
                    ids = gen.render(tid, messages=[{"role": "user", "content": q}])
                    c = Collector()
                    jobs.append((gen.submit(tid, ids, no_eos(gen, tid, ids), c), c))
            for _, c in jobs:
                assert c.done.wait(120)
            outs[keep] = [r.tokens for r, _ in jobs]
            reused[keep] = gen.stats()["decode_plans_reused"]
            slots = gen.slots
            with torch.inference_mode():  # the slot tables are inference tensors
                with eng.cache.use(["t0"]) as (res, _):
                    s0 = slots.assign([slot_key("t0", f"x{keep}")], res)[0][0]
                rows = [s0, slots.empty]
                slots.activate(rows)
                slots.activate(rows)
                assert slots.reused == (keep is None)
                with eng.cache.use(["t1"]) as (res, _):
                    slots.assign([slot_key("t1", f"y{keep}")], res)  # a slot written: the kept plans are stale
                slots.activate(rows)
                assert not slots.reused
                slots.deactivate()
        finally:
            gen.close()
    assert outs[0] == outs[None]
    assert reused[0] == 0 < reused[None]


def test_seeded_sampling_repeats_whatever_shares_the_batch(setup):
    eng, _, _ = setup
    gen = TextGenerator(eng, "continuous", max_requests=16, max_batch_tokens=256, page_size=32)
    try:
        def sample(seed, others=0):
            ids = gen.render("t0", prompt="Tell me a story")
            side = [gen.submit("t1", ids, no_eos(gen, "t1", ids, temperature=1.0), Collector()) for _ in range(others)]
            c = Collector()
            r = gen.submit("t0", ids, no_eos(gen, "t0", ids, temperature=1.0, top_p=0.9, seed=seed), c)
            assert c.done.wait(60)
            for s in side:
                gen.cancel(s.rid)
            return r.tokens
        a, b, c = sample(7), sample(7, others=3), sample(8)
        assert a == b and a != c
    finally:
        gen.close()


def test_stop_strings_and_length(setup):
    eng, _, _ = setup
    gen = TextGenerator(eng, "continuous", max_requests=8, max_batch_tokens=256, page_size=32)
    try:
        ids, r, c = start(gen, None, QUESTIONS[0])
        assert c.done.wait(60)
        full = gen.decode(r.tokens)
        assert c.text == full[:len(c.text)]
        stop = full[3:6]  # a stop string from the middle of the greedy answer
        _, r2, c2 = start(gen, None, QUESTIONS[0], stop=[stop])
        assert c2.done.wait(60)
        assert c2.finish == "stop" and c2.text == full[:full.index(stop)] and stop not in c2.text
        ids = gen.render(None, messages=[{"role": "user", "content": QUESTIONS[0]}])
        c3 = Collector()
        gen.submit(None, ids, no_eos(gen, None, ids, max_tokens=3), c3)
        assert c3.done.wait(60) and c3.finish == "length" and c3.events[-1].completion_tokens == 3
    finally:
        gen.close()


def test_context_budget_and_prompt_errors(setup):
    eng, _, _ = setup
    gen = TextGenerator(eng, "padded")
    try:
        with pytest.raises(GenerationInputError) as ei:
            gen.params("t0", 120, max_tokens=9)
        assert ei.value.param == "max_tokens" and ei.value.code == "context_length_exceeded"
        with pytest.raises(GenerationInputError, match="prompt has 128 tokens"):
            gen.params("t0", 128)
        assert gen.params("t0", 100).max_new_tokens == N  # the task's default, inside the room left
        assert gen.params(None, 125).max_new_tokens == 3  # capped by the room left
        for bad in ([], [{"role": "user", "content": 3}], [{"role": "tool", "content": "x"}]):
            with pytest.raises(GenerationInputError):
                gen.render("t0", messages=bad)
        with pytest.raises(RuntimeError, match="decode loop"):
            eng.forward({"input_ids": torch.ones(1, 3, dtype=torch.long)}, ["t0"])  # no patching under a decoder
    finally:
        gen.close()


def test_admission_caps_tasks_in_flight_and_cancel_frees_the_cache(setup):
    eng, _, _ = setup
    # KV room for about two full contexts: leaked blocks would starve the later requests
    gen = TextGenerator(eng, "continuous", max_tasks_per_batch=2, max_requests=8, max_batch_tokens=256,
                        kv_cache_tokens=256, page_size=32)
    dec = gen.decoder
    seen = []
    try:
        cs = []
        for tid in ["t0", "t1", "t2", "t0"]:
            ids = gen.render(tid, prompt="count")
            c = Collector()

            def sink(ev, c=c):
                seen.append(len(dec._inflight))  # task keys in flight while a token is delivered
                c(ev)
            cs.append((gen.submit(tid, ids, no_eos(gen, tid, ids, max_tokens=6), sink), c))
        for r, c in cs:
            assert c.done.wait(60) and r.finished == "length"
        assert max(seen) <= 2 and dec.counters["waited"] >= 1
        for _ in range(6):  # long requests cancelled after their first token, again and again
            ids = gen.render("t1", prompt="a long story")
            c = Collector()
            r = gen.submit("t1", ids, no_eos(gen, "t1", ids, max_tokens=100), c)
            while not r.tokens and r.finished is None:
                time.sleep(0.005)
            gen.cancel(r.rid)
            assert c.done.wait(10) and c.finish == "cancelled"
        ids, r, c = start(gen, "t2", "still served?")
        assert c.done.wait(30) and r.finished in ("stop", "length")
        assert gen.decoder.pending() == 0 and not dec._inflight
    finally:
        gen.close()


def test_a_failing_step_fails_its_requests_only_and_the_loop_recovers(setup):
    eng, _, _ = setup
    gen = TextGenerator(eng, "continuous", max_requests=8, max_batch_tokens=256, page_size=32)
    boom = {"left": 1}

    def fail_once(module, args, kwargs):
        if boom["left"]:
            boom["left"] -= 1
            raise RuntimeError("injected")
    h = gen.backbone.lm.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        _, r, c = start(gen, "t0", QUESTIONS[0])
        assert c.done.wait(30) and c.finish == "error"
        h.remove()
        _, r2, c2 = start(gen, "t1", QUESTIONS[1])
        assert c2.done.wait(60) and c2.finish in ("stop", "length") and r2.tokens, c2.events
        assert gen.decoder.counters["restarts"] == 1
    finally:
        h.remove()
        gen.close()
