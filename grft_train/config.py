"""Run configurations for ``grft-train select|fit|eval``.

One YAML file describes a run. Top-level keys shared by all commands (``backbone``, ``data``,
``input_size``, ``seed``, ``device``) may be given once; command-specific keys go either at the top
level or under a section named after the command (``select:``, ``fit:``, ``eval:``), so one file can
drive a whole select → fit → eval pipeline. Command-line flags and ``--set key.sub=value`` override
the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grft_serve.core.backbones import BackboneConfig
from grft_serve.core.files import ConfigFileError, read_yaml_mapping

from .data import DataConfig

COMMANDS = ("select", "fit", "eval")
OBJECTIVES = ("auto", "classification", "causal_lm")
BACKBONE_DOCS = {
    "type": "timm (any timm model) | hf (local transformers directory) | zoo (efficientnet_lite0, minilm, smollm2)",
    "name": "timm model name or zoo name",
    "weights": "timm: local pretrained weights file (required), or `random` for a random init on purpose",
    "checkpoint": "timm: local checkpoint file",
    "path": "hf: local model directory",
    "pooling": "hf: mean | last token pooling",
    "max_length": "text: max tokens per input",
    "model_kwargs": "timm: extra create_model kwargs (e.g. {img_size: 32, patch_size: 8})",
}


__all__ = ["ConfigError", "SelectConfig", "FitConfig", "EvalConfig", "GenerationConfig", "COMMANDS", "MODELS",
           "OBJECTIVES", "parse_set", "merge_overrides", "load_config", "options_help"]


class ConfigError(ValueError):
    """A run configuration is invalid (unknown key, wrong type, missing file, ...)."""


class GenerationConfig(BaseModel):
    """How a generation task renders its examples and answers (``objective: causal_lm``); recorded in
    the package as :class:`grft_serve.core.generation.GenerationMeta`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["auto", "completion", "chat"] = Field(
        "auto", description="auto: chat for {messages} records, completion for {prompt, completion} ones; "
                            "chat: {prompt, completion} records become a user turn and the assistant's answer "
                            "(the tokenizer's chat template)")
    prompt_template: str = Field("{prompt}", description="completion format: text around the prompt, with one "
                                                         "'{prompt}' (e.g. 'Question: {prompt}\\nAnswer:')")
    add_special_tokens: bool = Field(False, description="completion format: the tokenizer's special tokens (BOS) "
                                                        "before the prompt")
    max_new_tokens: int | None = Field(None, ge=1, le=8192, description="answer length limit recorded in the "
                                       "package (default: twice the longest training answer, 16..512 tokens)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="sampling default (0: greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="sampling default (nucleus)")
    stop: list[str] = Field(default_factory=list, description="stop strings recorded in the package "
                                                              "(e.g. ['\\n'] for one-line answers)")


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objective: Literal["auto", "classification", "causal_lm"] = Field(
        "auto", description="classification (SCL selection, CE + a new head) | causal_lm (selection and training "
                            "by the cross-entropy of the answer tokens; a generation package) | auto (causal_lm "
                            "on a causal-LM backbone, else classification)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="causal_lm: prompt format and answer defaults")

    backbone: BackboneConfig = Field(default_factory=BackboneConfig,
                                     description="backbone: type timm|hf|zoo, name, weights, path, ...")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and split (see data.* keys)")
    input_size: int | None = Field(None, ge=8, description="image backbones: square input resolution to "
                                                          "use instead of the model's default (recorded "
                                                          "in the package preprocessing)")
    seed: int = Field(0, description="random seed (augmentations, subsets, head init, shuffling)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    batch_size: int = Field(32, ge=1, description="batch size")
    progress: bool = Field(True, description="show tqdm progress bars")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice; 1 is "
                                                        "often fastest on small shared machines)")


class SelectConfig(_Common):
    """``grft-train select``: score rows/columns by SCL gradients and keep the top ones."""

    out: str = Field("runs/selection.safetensors", description="selection file to write (safetensors); "
                                                              "a heat-map PNG is written next to it")
    mode: Literal["row", "column", "sparse"] = Field(
        "row", description="row: whole output rows/channels; column: whole input columns (grouped convs "
                           "are skipped); sparse: GPS top-k entries per row (baseline, not packageable)")
    k: int = Field(1, ge=1, description="rows/columns kept per matrix (sparse: entries per row); "
                                        "ignored when `budget` is set")
    budget: float | None = Field(None, gt=0, lt=1, description="global trainable-parameter budget as a "
                                 "fraction of all backbone parameters; converted to a uniform per-matrix k "
                                 "(largest that fits), or to single rows for the highest-scoring matrices "
                                 "when even k=1 does not fit")
    include_patch_embed: bool = Field(True, description="also select in the patch/stem embedding conv")
    include: list[str] = Field(default_factory=list, description="regexes: only modules whose name matches "
                                                                 "one of them are eligible (empty: all)")
    exclude: list[str] = Field(default_factory=list, description="regexes: modules never selected (heads are "
                                                                 "always excluded; norms/pos-embed/cls are not "
                                                                 "patchable anyway)")
    num_batches: int | None = Field(None, ge=1, description="batches of SCL gradients to accumulate "
                                                            "(default: one full pass over the chosen subset, "
                                                            "as GPS and GRFT do)")
    subsets: int = Field(1, ge=1, description="split the train data into n subsets, compute the SCL loss on "
                                             "each and select on the one with the lowest loss")
    temperature: float = Field(0.07, gt=0, description="SCL temperature")
    heatmap: bool = Field(True, description="write a PNG heat-map of the selected rows per layer")


BIAS_DOCS = ("which backbone biases train: all (default, as the GRFT/GPS papers count their trainable "
             "parameters: every patchable module's bias; modules without one get a zero-initialised bias, "
             "for Conv->BatchNorm the same degree of freedom as the BN shift) | selected (only modules with "
             "selected rows/columns that have a bias) | none")


class FitConfig(_Common):
    """``grft-train fit``: train only the selected rows (+ biases + head) with L2 to pretrained."""

    selection: str = Field("runs/selection.safetensors", description="selection file from `select`")
    task_id: str = Field("task", description="task id written in the package ([A-Za-z0-9_.-])")
    out_dir: str = Field("runs/fit", description="directory for the package, metrics.json and curves.png")
    package: str | None = Field(None, description="package path (default: <out_dir>/<task_id>.grft.safetensors)")
    epochs: int = Field(5, ge=1, description="training epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (tests, demos)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of every trainable parameter (rows/columns, "
                                              "biases and head: one learning rate, as the papers train)")
    head_lr: float | None = Field(None, gt=0, description="optional separate Adam learning rate of the head "
                                                         "(default: lr)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay (GPS/GRFT use 0; the L2 term is "
                                                       "the regulariser)")
    warmup_epochs: float = Field(0.5, ge=0, description="linear warm-up length (epochs), then cosine decay to 0")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps per optimizer step")
    l2_lambda: float = Field(1e-4, ge=0, description="λ of λ·Σ‖θ − θ_pre‖² over the regularised layers")
    l2_last_layers: int = Field(2, ge=-1, description="regularise the modules of the last L layers (transformer "
                                                      "blocks; CNN: blocks of every stage in order, then the "
                                                      "final conv as the last layer; -1: all, 0: none)")
    l2_embed: bool = Field(True, description="regularise the patch/stem embedding")
    l2_head: bool = Field(True, description="regularise the head towards its initialisation")
    bias: Literal["all", "selected", "none"] = Field("all", description=BIAS_DOCS)

    @model_validator(mode="before")
    @classmethod
    def _legacy_tune_bias(cls, data: Any) -> Any:
        """Run files of earlier releases: ``tune_bias: true|false`` meant ``bias: selected|none``."""
        if isinstance(data, dict) and "tune_bias" in data:
            data = dict(data)
            legacy = data.pop("tune_bias")
            data.setdefault("bias", "selected" if legacy else "none")
        return data
    head_init: Literal["zero", "small"] = Field("small", description="head init: zero, or N(0, 0.01²) weights "
                                                                     "with zero bias")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    augment: bool = Field(False, description="image tasks: random resized crop (0.5–1) + flip while training")
    eval_every: int = Field(1, ge=1, description="evaluate on val every N epochs (and after the last)")


class EvalConfig(_Common):
    """``grft-train eval``: accuracy of a task package on a split (generation: exact match, ROUGE-L and
    answer perplexity, against the base)."""

    package: str | None = Field(None, description="task package (.grft.safetensors)")
    split: Literal["train", "val", "test"] = Field("test", description="split to evaluate")
    out: str | None = Field(None, description="optional JSON file for the report")
    max_new_tokens: int | None = Field(None, ge=1, le=8192, description="generation tasks: answer length limit "
                                                                      "(default: the package's)")
    compare_base: bool = Field(True, description="generation tasks: also score the untuned base on the split")


MODELS: dict[str, type[_Common]] = {"select": SelectConfig, "fit": FitConfig, "eval": EvalConfig}


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_set(items: list[str] | None) -> dict:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        _set_dotted(out, k.strip(), yaml.safe_load(v) if v != "" else None)
    return out


def merge_overrides(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_overrides(out[k], v)
        else:
            out[k] = v
    return out


def load_config(command: str, path: str | Path | None = None, overrides: dict | None = None):
    """Build the config of ``command`` from a YAML file (optional) and overrides (flags, --set)."""
    model = MODELS[command]
    raw: dict = {}
    if path is not None:
        try:
            raw = read_yaml_mapping(path)
        except ConfigFileError as e:
            raise ConfigError(str(e)) from None
    section = raw.get(command) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"section {command!r} must be a mapping")
    base = {k: v for k, v in raw.items() if k not in COMMANDS}
    # keys of another command's model at the top level are fine (shared file); drop the unknown ones
    allowed = set(model.model_fields)
    every = set().union(*(m.model_fields for m in MODELS.values()))
    unknown = [k for k in base if k not in every]
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known: {sorted(every)}")
    base = {k: v for k, v in base.items() if k in allowed}
    overrides = dict(overrides or {})
    own = overrides.pop(command, None) or {}  # `--set fit.epochs=3` == `--set epochs=3` for fit
    for other in COMMANDS:
        overrides.pop(other, None)
    merged = merge_overrides(merge_overrides(merge_overrides(base, section), own), overrides)
    try:
        return model(**merged)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise ConfigError(f"invalid {command} config: {msgs}") from None


def options_help(command: str) -> str:
    """Every config key of ``command`` with its description (for --help)."""
    model = MODELS[command]
    lines = []

    def walk(m: type[BaseModel], prefix: str):
        for name, f in m.model_fields.items():
            ann = f.annotation
            sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = f.default if f.default_factory is None else f.default_factory()
            desc = f.description or (BACKBONE_DOCS.get(name, name) if prefix == "backbone." else name)
            lines.append(f"{prefix}{name} (default {default!r}): {desc}")

    walk(model, "")
    return "\n".join(lines)
