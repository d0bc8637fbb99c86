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
