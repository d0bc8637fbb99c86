"""Bounded work before validation, without Ray: the JSON value budget counted over the bytes, and the
task index answering unknown ids and single-task reads without listing the store. (The same attacks
over HTTP: tests/test_hardening_http.py.)
"""
from __future__ import annotations

import json
import time

from app_fixtures import VIT_CFG, build_local_backbone
from grft_serve.app.bodies import json_values_over
from grft_serve.app.index import TaskIndex
from grft_serve.core.package import package_bytes
from grft_serve.store import DirectoryTaskStore
from grft_serve.testing import random_package


def test_the_json_value_budget_counts_only_structure_outside_strings():
    assert not json_values_over(json.dumps({"inputs": ["a, [b] {c}, \\\" d" * 500] * 64}).encode(), 768)
    assert not json_values_over(json.dumps({"items": [{"task": "t", "input": "x"}] * 64}).encode(), 768)
    assert json_values_over(b'{"items": [' + b"0," * 10_000 + b"0]}", 768)
    assert json_values_over(b'["' + b'\\"' * 100_000 + b'",' + b"[]," * 1000 + b"0]", 768)
    t0 = time.monotonic()
    assert json_values_over(b'{"items": [' + b"0," * (32 << 20) + b"0]}", 768)  # 64 MiB
    assert time.monotonic() - t0 < 1.0


def test_unknown_ids_and_single_task_reads_never_list_the_store(tmp_path):
    class Counting(DirectoryTaskStore):
        lists = 0

        def list(self):
            Counting.lists += 1
            return super().list()

    store = Counting(tmp_path)
    net = build_local_backbone(VIT_CFG)
    for i in range(20):
        store.put(f"t{i}", package_bytes(random_package(net, f"t{i}", seed=i)))
    index = TaskIndex(store, ttl_s=60)
    for i in range(500):
        assert index.get(f"nope{i % 50}") is None  # misses are cached too
    assert index.get("t3").version and index.refresh("t4").version
    assert Counting.lists == 0 and index.get("new") is None
    store.put("new", package_bytes(random_package(net, "new", seed=99)))
    assert index.get("new") is None  # a cached miss, until it expires or the id is refreshed
    assert index.refresh("new") is not None and index.get("new") is not None
    assert set(index.snapshot()) == {f"t{i}" for i in range(20)} | {"new"} and Counting.lists == 1
