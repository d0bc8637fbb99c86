"""Property-based fuzzing of the package validator, through a real engine.

Valid packages (row and column mode, biases on modules with and without a base bias, bias-only
entries) are mutated at every layer — the header JSON (types and values of dtypes, shapes, offsets,
entries, ``__metadata__``), the task metadata (every field, the preprocessing), the tensors (shapes,
dtypes, index and value contents) and the raw bytes — and registered into an :class:`Engine` on a
tiny MLP and a tiny CNN. Every case must either register or raise a :class:`PackageError` with a 4xx status;
nothing else may escape, the base weights stay bit-identical, and a reference task registered
beforehand answers exactly as before. A case that registers must also serve on both paths.

Examples are bounded and derandomized (profiles in ``tests/fuzz_support.py``).
"""
import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_cnn, tiny_mlp
from fuzz_support import damage, join, split
from grft_serve.engine import Engine
from grft_serve.core.package import PackageError, load_package, package_bytes, read_header
from grft_serve.core.rowop import ModuleDelta
from grft_serve.store import DirectoryTaskStore
from grft_serve.testing import random_package

MAX_BYTES = 4 << 20
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", ""]


class World:
    """One engine on a tiny model (a bias-free module included), valid seed packages, a reference task."""

    def __init__(self, root, backbone, x):
        self.store = DirectoryTaskStore(root)
        self.backbone, self.x = backbone, x
        self.engine = Engine(self.backbone, max_package_bytes=MAX_BYTES)
        spec = self.engine.spec
        fp = spec.fingerprint
        self.seeds = [package_bytes(random_package(self.backbone, "seed", mode=m, k=k, tune_bias=b, fingerprint=fp))
                      for m, k, b in (("row", 2, True), ("column", 3, False), ("row", 1, False))]
        # biases on every module (a zero-initialised one where the base has none), one bias-only entry
        pkg = random_package(self.backbone, "seed", k=2, fingerprint=fp)
        deltas = {}
        for i, (name, s) in enumerate(spec.modules.items()):
            d = pkg.deltas[name]
            k = 0 if i == 0 else d.k
            deltas[name] = ModuleDelta("row", d.indices[:k], d.values[:k], torch.randn(s.out_features))
        pkg.deltas = deltas
        self.seeds.append(package_bytes(pkg))
        self.ref_data = package_bytes(random_package(self.backbone, "ref", k=2, tune_bias=True, fingerprint=fp, seed=7))
        self.engine.register(self.ref_data)
        self.ref_logits = self.forward("ref")
        self.base = self.snapshot()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}

    def forward(self, tid: str, path: str = "patch") -> torch.Tensor:
        logits, _ = self.engine.forward(self.x, [tid] * len(self.x), path=path)
        return torch.stack(logits)

    def header_outcome(self, source) -> object:
        try:
            return read_header(source, MAX_BYTES)
        except PackageError as e:
            assert 400 <= e.status < 500 and e.code and e.message, e
            return type(e)

    def check(self, data: bytes) -> str:
        """Register ``data``: a PackageError (4xx) or a servable task; the base never changes.
        The header read from a file (what the store does) agrees with the one from bytes, and the
        store reports the file as a task or as broken, never fails on it."""
        from_bytes = self.header_outcome(data)
        # stored under its own id (a package stored under another name is broken by design)
        tid = "fz" if from_bytes.__class__ is type else from_bytes.meta.task_id
        path = self.store.path(tid)
        path.write_bytes(data)
        assert repr(self.header_outcome(path)) == repr(from_bytes)  # repr: NaN metrics compare equal
        stored = self.store.info(tid)
        assert (stored.broken is None) == (from_bytes.__class__ is not type) or len(data) > MAX_BYTES
        try:
            info = self.engine.register(data, replace=True)
        except PackageError as e:
            assert 400 <= e.status < 500 and e.code and e.message, e
            outcome = type(e).__name__
        else:
            outcome = "registered"
            hdr = read_header(data, MAX_BYTES)  # the header alone agrees with the full load
            assert hdr.num_params == info.num_params == load_package(data).num_params()
            if info.task_id != "ref":
                for path in ("patch", "override"):
                    got = self.forward(info.task_id, path)
                    assert got.shape == (len(self.x), len(info.meta.labels))
                self.engine.unregister(info.task_id)
        after = self.snapshot()
        assert after.keys() == self.base.keys()
        for k, v in self.base.items():
            assert torch.equal(after[k], v), f"base weight {k} changed"
        if outcome == "registered" and info.task_id == "ref":  # a mutation may replace the reference
            self.engine.register(self.ref_data, replace=True)
        assert torch.equal(self.forward("ref"), self.ref_logits)
        return outcome


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def world(request, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    if request.param == "mlp":  # linear layers, one without a bias
        bb, x = tiny_mlp(), torch.randn(3, 12, generator=g)
    else:  # convs: grouped (row mode only), bias-free, BN
        bb, x = tiny_cnn(), torch.randn(2, 3, 32, 32, generator=g)
    w = World(tmp_path_factory.mktemp("fuzz-store"), bb, x)
    for s in w.seeds:  # the seeds themselves are valid
        assert w.check(s) == "registered"
    return w


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------
json_leaf = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.integers(-3, 40)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6) | st.sampled_from(DTYPES))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)


def _names(header):
    return [k for k in header if k != "__metadata__"]


def _targets(names) -> list[str]:
    """Tensor names a mutation may move or copy a tensor to: the package's modules' other parts,
    the head, and names that are not a module of the base."""
    mods = sorted({n.rpartition(".")[0] for n in names if not n.startswith("head.")})
    return [f"{m}.{part}" for m in mods for part in ("indices", "values", "bias")] + \
        ["head.weight", "head.bias", ".values", "nope.values", "x.bias"]


def mutate_header(draw, data: bytes) -> bytes:
    header, body = split(data)
    for _ in range(draw(st.integers(1, 3))):
        names = _names(header)
        op = draw(st.sampled_from(["field", "offsets", "shape", "dtype", "rename", "drop", "metadata"]))
        name = draw(st.sampled_from(names)) if names else None
        if op == "field" and name:
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            if draw(st.booleans()):
                header[name][key] = draw(json_value)
            else:
                header[name].pop(key, None)
        elif op == "offsets" and name and isinstance(header[name].get("data_offsets"), list):
            offs = header[name]["data_offsets"]
            j = draw(st.integers(0, max(len(offs) - 1, 0)))
            if offs and isinstance(offs[j], int):
                offs[j] += draw(st.integers(-9, 9) | st.integers(-(1 << 62), 1 << 62))
        elif op == "shape" and name and isinstance(header[name].get("shape"), list):
            shape = header[name]["shape"]
            how = draw(st.sampled_from(["set", "append", "pop", "reverse"]))
            if how == "set" and shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-2, 1 << 41) | st.integers(0, 9))
            elif how == "append":
                shape.append(draw(st.integers(0, 3) | st.integers(1 << 20, 1 << 40)))
            elif how == "pop" and shape:
                shape.pop()
            else:
                shape.reverse()
        elif op == "dtype" and name:
            header[name]["dtype"] = draw(st.sampled_from(DTYPES))
        elif op == "rename" and name:
            new = draw(st.sampled_from(_targets(names) + ["__metadata__"]))
            header[new] = header.pop(name)
        elif op == "drop" and name:
            del header[name]
        else:
            md = header.get("__metadata__")
            header["__metadata__"] = draw(json_value) if draw(st.integers(0, 4)) == 0 or not isinstance(md, dict) \
                else {**md, draw(st.sampled_from(["grft", "other"])): draw(st.text(max_size=20))}
    return join(header, body)


META_KEYS = ["format_version", "task_id", "base_model_id", "base_fingerprint", "mode", "k", "labels",
             "preprocessing", "metrics", "training_config", "created", "extra_field"]
PREP_VALUES = st.one_of(
    json_value,
    st.fixed_dictionaries({"kind": st.sampled_from(["tensor", "image", "text", "video", ""])},
                          optional={"pooling": json_value | st.sampled_from(["mean", "last"]),
                                    "max_length": st.integers(-5, 100_000) | json_value,
                                    "timm_data_config": json_value | st.fixed_dictionaries(
                                        {"input_size": st.lists(st.integers(-1, 5000), min_size=2, max_size=4)},
                                        optional={"crop_pct": json_value, "mean": json_value, "zzz": json_value}),
                                    "other": json_value}))


def mutate_meta(draw, data: bytes) -> bytes:
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["grft"])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(META_KEYS))
        how = draw(st.sampled_from(["value", "drop", "labels", "prep"]))
        if how == "drop":
            meta.pop(key, None)
        elif how == "labels":
            labels = list(meta.get("labels") or [])
            meta["labels"] = draw(st.sampled_from([labels[:-1], labels + labels[:1], labels[::-1], [], labels[:1] * 3,
                                                   [f"l{i}" for i in range(len(labels))]]))
        elif how == "prep":
            meta["preprocessing"] = draw(PREP_VALUES)
        else:
            meta[key] = draw(json_value)
    raw = json.dumps(meta) if draw(st.integers(0, 9)) else draw(st.text(max_size=30))
    header["__metadata__"]["grft"] = raw
    return join(header, body)


def mutate_tensors(draw, data: bytes) -> bytes:
    """Well-formed safetensors files whose tensors are wrong in content, shape or dtype."""
    from safetensors.torch import load, save

    header, _ = split(data)
    meta = header["__metadata__"]
    t = load(data)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(t)))
        v = t[name]
        op = draw(st.sampled_from(["values", "dtype", "reshape", "slice", "drop", "copy", "empty", "indices"]))
        if op == "values" and v.numel():
            flat = v.reshape(-1).clone()
            i = draw(st.integers(0, flat.numel() - 1))
            if flat.is_floating_point():
                flat[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -0.0, 1e-45, 65504.0]))
            else:
                flat[i] = draw(st.integers(-(1 << 31), (1 << 31) - 1))
            t[name] = flat.view(v.shape)
        elif op == "dtype":
            dt = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8,
                                       torch.uint8, torch.bool, torch.float32]))
            t[name] = v.to(dt)
        elif op == "reshape" and v.numel():
            t[name] = v.reshape(-1) if v.dim() > 1 else v.reshape(1, -1)
        elif op == "slice" and v.dim() and v.shape[0]:
            t[name] = v[: draw(st.integers(0, v.shape[0] - 1))].clone()
        elif op == "drop":
            t.pop(name)
        elif op == "copy":
            other = draw(st.sampled_from(_targets(list(t))))
            t[other] = v.clone()
        elif op == "empty":
            t[name] = v[:0].clone() if v.dim() else v
        elif op == "indices" and name.endswith(".indices") and v.numel():
            n = draw(st.integers(0, 40))
            t[name] = torch.tensor(draw(st.lists(st.integers(-2, 40), min_size=v.numel(), max_size=v.numel())),
                                   dtype=v.dtype) if n % 2 else torch.arange(n, dtype=v.dtype)
    return save(t, metadata=meta)


def mutate_bytes(draw, data: bytes) -> bytes:
    op = draw(st.sampled_from(["flip", "truncate", "append", "header_byte", "prefix"]))
    b = damage(draw, bytearray(data), op, max_flips=8, max_tail=64)
    if op == "header_byte":
        n = struct.unpack("<Q", data[:8])[0]
        b[draw(st.integers(8, 8 + n - 1))] = draw(st.sampled_from(b'{}[]",:0123456789-eE. \\\x00\xff'))
    elif op == "prefix":
        b[:8] = struct.pack("<Q", draw(st.integers(0, 1 << 64 - 1) | st.integers(0, 600)))
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
MUTATORS = [mutate_header, mutate_meta, mutate_tensors, mutate_bytes]


@pytest.mark.parametrize("mutate", MUTATORS, ids=lambda m: m.__name__)
@given(data=st.data())
def test_fuzz(world, mutate, data):
    world.check(mutate(data.draw, data.draw(st.sampled_from(world.seeds))))


@given(st.binary(max_size=256))
def test_fuzz_arbitrary_bytes(world, blob):
    assert world.check(blob) != "registered"


def test_mutations_reach_every_outcome(world):
    """The fuzzers are not vacuous: across a fixed sample, valid and many kinds of invalid packages."""
    seen = set()

    @given(st.data())
    @settings(max_examples=200, derandomize=True, database=None, deadline=None)
    def collect(data):
        m = data.draw(st.sampled_from(MUTATORS))
        seen.add(world.check(m(data.draw, data.draw(st.sampled_from(world.seeds)))))

    collect()
    assert "registered" in seen and len(seen) >= 8, seen
