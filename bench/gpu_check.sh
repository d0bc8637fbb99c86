#!/usr/bin/env bash
# The GPU checks in ONE call (about 6 min on one H100/H200; every step has its own time limit).
#
# Prepare here (needs the package registry and the SmolLM2 zoo cache):  make gpu-pack
#   -> .gpu/whl (the wheels the GPU image lacks or holds at other versions: pydantic, transformers,
#      peft, ...) and .gpu/tokenizer (SmolLM2's tokenizer + chat template)
# On the GPU machine (carry .gpu):                                      bash bench/gpu_check.sh
# Here, as a CPU smoke of this script (tiny sizes, same steps):         DEVICE=cpu SMOKE=1 bash bench/gpu_check.sh
#
# Steps (logs and JSON lines under $OUT, default bench/results/gpu):
#   env       nvidia-smi, python / torch / transformers versions
#   pytest    pytest -m gpu (engine: CUDA slot tables, graphs, cold loads) — skipped tests on CPU
#   engine    python -m bench.engine  (ViT-B/16 batch 64, LLaMA-1B shape 32 x 128, bf16, T=1,4,16,64)
#   graphs    the same with --graphs (CUDA graphs per batch bucket)
#   generate  python -m bench.generate on a random SmolLM2-135M-shaped LM (real tokenizer), bf16:
#             continuous and padded decoders, T=1,16,64 tasks, 64 requests x 64 tokens, PEFT LoRA peer
# The script goes on after a failed step and exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
mkdir -p "$OUT"
# the carried wheels, where this python lacks what the project pins (the GPU image: no pydantic, an
# older transformers)
if compgen -G ".gpu/whl/*.whl" >/dev/null && ! $PY -c "import pydantic, peft, transformers as t; \
    assert t.__version__.startswith('5.25')" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/grft-site \
    .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/grft-site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
failed=()

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 30 "$OUT/$name.log"
  [ "$rc" = 0 ] || failed+=("$name")
}

step env 60 bash -c "nvidia-smi || true; $PY -c 'import sys, torch, transformers; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available()); \
print(\"transformers\", transformers.__version__)'"

if [ "$SMOKE" = 1 ]; then
  LM_SHAPE=tiny; ENGINE=(--smoke --device "$DEVICE"); GEN=(--smoke --device "$DEVICE")
else
  LM_SHAPE=smollm2-135m; ENGINE=(--device "$DEVICE" --tasks 1,4,16,64 --repeats 5)
  GEN=(--device "$DEVICE" --requests 64 --new-tokens 64 --tasks 1,16,64 --rounds 2 --interval 0.02)
fi
TOK=()
[ -d .gpu/tokenizer ] && TOK=(--tokenizer .gpu/tokenizer)
LM=${LM:-/tmp/grft-random-lm-$LM_SHAPE}

step pytest 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py
step engine 150 $PY -m bench.engine "${ENGINE[@]}" --out "$OUT/engine_$DEVICE.jsonl"
step graphs 150 $PY -m bench.engine "${ENGINE[@]}" --graphs --out "$OUT/engine_${DEVICE}_graphs.jsonl"
step random_lm 120 $PY -m bench.random_lm "$LM" --shape "$LM_SHAPE" "${TOK[@]}"
step generate 240 $PY -m bench.generate --model "$LM" "${GEN[@]}" --out "$OUT/generate_$DEVICE.jsonl" \
  --table "$OUT/generate_$DEVICE.md"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]} (logs in $OUT)"; exit 1
fi
echo "all steps passed (results in $OUT)"
