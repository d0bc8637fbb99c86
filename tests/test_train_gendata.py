"""Generation data: bad records are CLI errors naming the file, the line and the problem; the offline
converters write JSONL that the generic loader reads; the answer metrics on known strings."""
from __future__ import annotations

import json

import pytest
import yaml
from gen_fixtures import make_tiny_lm
from typer.testing import CliRunner

from grft_train.cli import app
from grft_train.gendata import load_examples
from grft_train.genmetrics import answer_metrics, exact_match, normalize_answer, rouge_l

GOOD = {"prompt": "What is 1 + 1?", "completion": "2"}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def _run(tmp_path, lm_dir, lines: list, max_length: int = 48, *args):
    data = tmp_path / "data.jsonl"
    data.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "backbone": {"type": "causal_lm", "path": str(lm_dir), "max_length": max_length}, "objective": "causal_lm",
        "data": {"format": "jsonl", "path": str(data), "val_fraction": 0.0, "test_fraction": 0.0},
        "device": "cpu", "progress": False, "select": {"out": str(tmp_path / "sel.safetensors")}}))
    res = CliRunner().invoke(app, ["select", "-c", str(cfg), "--quiet", *args])
    return res, str(data)


@pytest.mark.parametrize("bad, why", [
    ({"prompt": "What is 2 + 2?", "completion": ""}, "empty completion"),
    ({"prompt": "What is 2 + 2?", "answer": "4"}, "missing key 'completion'"),
    ({"question": "What is 2 + 2?"}, "missing key 'prompt'"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "the last message must be the assistant's answer"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "empty completion"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "role must be one of"),
    ({"prompt": "word " * 80, "completion": "x"}, "prompt longer than the context"),
    ("{not json", "invalid JSON"),
], ids=["empty", "missing-completion", "missing-prompt", "no-assistant", "empty-assistant", "bad-role",
        "prompt-too-long", "not-json"])
def test_bad_data_is_a_cli_error_naming_line_and_problem(tmp_path, lm_dir, bad, why):
    res, path = _run(tmp_path, lm_dir, [GOOD, GOOD, bad])
    assert res.exit_code == 1, res.output
    assert f"{path}:3" in res.output and why in res.output
    assert not (tmp_path / "sel.safetensors").exists()


def test_mixed_record_kinds_and_wrong_objective_are_refused(tmp_path, lm_dir):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    res, path = _run(tmp_path, lm_dir, [GOOD, chat])
    assert res.exit_code == 1 and "mixes chat records" in res.output and f"{path}:2" in res.output
    res, _ = _run(tmp_path, lm_dir, [GOOD, GOOD], 48, "--set", "generation.format=bogus")
    assert res.exit_code == 2 and "generation.format" in res.output


def test_answer_metrics_on_known_strings():
    assert normalize_answer("The answer is Paris.") == "answer is paris"
    assert normalize_answer('"Hamlet",') == "hamlet" and normalize_answer("(-3)") == "-3"
    assert exact_match("-18181.8.", "-18181.8") == 1.0 and exact_match("5", "-5") == 0.0  # signs stay
    assert exact_match("An Apple", "apple") == 1.0 and exact_match("3.5", "35") == 0.0
    assert rouge_l("the cat sat", "cat sat on mat") == pytest.approx(4 / 7)  # LCS 2: P 2/3, R 2/4
    assert rouge_l("", "") == 0.0 and rouge_l("x y", "x y") == 1.0
    m = answer_metrics(["Paris", "the cat"], ["paris.", "a dog"])
    assert m == {"exact_match": 0.5, "rouge_l": pytest.approx(0.5), "n": 2}
    with pytest.raises(ValueError):
        answer_metrics(["a"], [])


def test_converters_write_jsonl_the_generic_loader_reads(tmp_path):
    pytest.importorskip("chatterbot_corpus")
    pytest.importorskip("mathematics_dataset")
    r = CliRunner().invoke(app, ["data", "chatterbot", "--out", str(tmp_path / "trivia.jsonl")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["records"] > 200
    splits = load_examples({"format": "jsonl", "path": str(tmp_path / "trivia.jsonl")})
    assert len(splits.train) + len(splits.val) + len(splits.test) == info["records"]
    assert splits.train[0].prompt and splits.train[0].completion
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        r = CliRunner().invoke(app, ["data", "math", "--module", "algebra__linear_1d", "--n", "30", "--seed",
                                     str(seed), "--out", str(tmp_path / f"{name}.jsonl")])
        assert r.exit_code == 0, r.output
    a, b, c = ((tmp_path / f"{n}.jsonl").read_text() for n in "abc")
    assert a == b and a != c  # deterministic for a seed
    recs = [json.loads(line) for line in a.splitlines()]
    assert len(recs) == 30 == len({r["prompt"] for r in recs}) and all(r["completion"] for r in recs)
    assert len(load_examples({"format": "jsonl", "path": str(tmp_path / "a.jsonl"), "val_fraction": 0.0}).test) == 3
    r = CliRunner().invoke(app, ["data", "math", "--module", "calculus__differentiate", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown math module" in r.output
