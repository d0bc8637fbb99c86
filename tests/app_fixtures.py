"""Helpers for the end-to-end Ray Serve tests (tests/test_app*.py): tiny backbones, app start/stop.

Both backbones are tiny and random but reproducible in every process: the ViT is built after
``torch.manual_seed(SEED)`` (the app config carries the same ``seed``), the text model is a random
BERT saved once to a directory that every replica loads.
"""
from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import torch

SEED = 1234
VIT_CFG = {"type": "timm", "name": "vit_tiny_patch16_224", "weights": "random",
           "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2,
                            "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}}
WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "a", "is", "was", "not", "very", "fun",
         "boring", "plot", "actor", "love", "hate", "it", "this"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_text_model(path: str | os.PathLike) -> Path:
    """A 2-layer random BERT + WordPiece tokenizer saved to ``path`` (offline, deterministic)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"))
    torch.manual_seed(SEED)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def text_cfg(path) -> dict:
    return {"type": "hf", "path": str(path), "max_length": 32}


def build_local_backbone(cfg: dict, seed: int | None = SEED):
    """The same backbone a replica builds (for fingerprints, packages and reference predictions)."""
    from grft_serve.core.backbones import load_backbone

    if seed is not None:
        torch.manual_seed(seed)
    return load_backbone(cfg)


def app_config(store: str, text_path, *, vit_replicas: int = 2, admin_env: str = "GRFT_TEST_ADMIN",
               read_env: str | None = None, **limits) -> dict:
    return {
        "store": {"path": str(store)},
        "admin_token_env": admin_env,
        "read_token_env": read_env,
        "sync_interval_s": 1.0,
        "task_cache_ttl_s": 0.0,
        "limits": {"max_inputs_per_request": 16, "max_text_chars": 200, "max_image_bytes": 200_000,
                   "max_package_bytes": 4_000_000, **limits},
        "backbones": [
            {"name": "vit", "backbone": VIT_CFG, "seed": SEED, "device": "cpu", "replicas": vit_replicas,
             "num_cpus": 0.25, "max_batch_size": 16, "batch_wait_timeout_s": 0.01},
            {"name": "text", "backbone": text_cfg(text_path), "device": "cpu", "replicas": 1, "num_cpus": 0.25,
             "max_batch_size": 16, "batch_wait_timeout_s": 0.01},
        ],
        "ingress_num_cpus": 0.1,
    }


def start_ray(num_cpus: int = 2) -> None:
    import ray

    from grft_serve.app.proxy import CALLBACK

    # Serve's proxies inherit this Ray's environment: they cap header bytes (grft_serve.app.proxy)
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", CALLBACK)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=free_port(),
                 log_to_driver=False, configure_logging=False)


def run_app(config: dict, port: int, name: str = "grft") -> str:
    """Deploy ``build_app(config)`` on 127.0.0.1:``port``; returns the base URL once it answers."""
    import requests
    from ray import serve

    from grft_serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise RuntimeError("app did not become healthy")
        time.sleep(0.2)


def png_bytes(seed: int, size=(40, 36)) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand((size[1], size[0], 3), generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def flat_image(w: int, h: int, fmt: str = "PNG", **save) -> bytes:
    """A one-colour image: a few KB on disk, ``w * h`` pixels to decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 140, 200)).save(buf, format=fmt, **save)
    return buf.getvalue()


def progressive_jpeg(w: int, h: int, scans: int) -> bytes:
    """A progressive JPEG whose last scan (with its Huffman table) is repeated until it has ``scans``
    scans: each repeat is ~35 bytes, and libjpeg decodes every one over every block of the image
    (what a scan bomb is; a repeated scan only draws a libjpeg warning)."""
    data = flat_image(w, h, "JPEG", progressive=True, quality=90)
    segs, i = [], 2  # (marker, start, end); a scan's segment runs to the end of its entropy-coded data
    while data[i + 1] != 0xD9:
        m, end = data[i + 1], i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        while m == 0xDA and (data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7):
            end += 1
        segs.append((m, i, end))
        i = end
    sos = [k for k, s in enumerate(segs) if s[0] == 0xDA]
    last = sos[-1]
    first = last - 1 if segs[last - 1][0] == 0xC4 else last
    block = data[segs[first][1]:segs[last][2]]
    return data[:segs[last][2]] + block * (scans - len(sos)) + data[segs[last][2]:]


class Canary:
    """A good client beside an attack: ``call()`` in a loop on its own thread until the block ends;
    ``latencies`` and ``failures`` (non-200 answers) are what it saw."""

    def __init__(self, call, pause_s: float = 0.05):
        self.call, self.pause_s = call, pause_s
        self.latencies: list[float] = []
        self.failures: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            r = self.call()
            self.latencies.append(time.monotonic() - t0)
            if r.status_code != 200:
                self.failures.append((r.status_code, r.text[:200]))
            self._stop.wait(self.pause_s)

    def __enter__(self) -> "Canary":
        self.call()  # warm (connection, task loaded)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(self.pause_s * 2)
        self._stop.set()
        self._thread.join(120)

    def check(self, max_s: float = 1.0) -> None:
        assert self.latencies, "the canary never ran"
        assert not self.failures, self.failures[:3]
        assert max(self.latencies) < max_s, f"canary latencies {sorted(self.latencies)[-5:]} (max {max_s} s)"


class PeakRss:
    """``with PeakRss(process) as m: ...`` samples the process's RSS every 2 ms; ``m.grew_mb`` is the
    peak over the block less the RSS at its start."""

    def __init__(self, process):
        self.process, self.grew_mb = process, 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "PeakRss":
        self._base = self._peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.grew_mb = (self._peak - self._base) / 2**20
