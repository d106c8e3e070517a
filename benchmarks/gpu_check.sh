#!/usr/bin/env bash
# The one command of a session that has a GPU: the GPU tests, the kernel tests on the compiled Triton path, then
# benchmarks/gpu_bench.py, each under a time limit (240 + 60 + 280 s) so that the whole stays inside the device
# tool's 10 minutes a command on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                      # everything
#   bash benchmarks/gpu_check.sh --parts gemv         # the tests, then only these benchmark parts (gpu_bench.py's flags)
#   SKIP_TESTS=1 bash benchmarks/gpu_check.sh ...     # the benchmark alone (a rerun)
#
# Run from the repository's root. Logs, the tests' JUnit XML and the benchmark's JSON lines go to $OUT (the device
# tool's folder that comes back; ./gpu-check elsewhere): six files, one folder deep. Append the benchmark's lines to
# the repository's record afterwards: cat .../gpu_bench.jsonl >> benchmarks/results.jsonl.
#
# Nothing is installed: the device machine (/work/.library/device/KINDS.md) gets a copy of the working tree but not
# .venv (far over the 64 MiB the copy may hold, and built for this machine), and it reaches no package registry, so
# `pip install -e .` would fail on the dependencies it lacks (datasets, lm-eval, snakemake, gguf, compressed-tensors,
# jsonschema, flash1dkmeans). Its own python3 holds everything these tests and the benchmark import (torch with CUDA,
# triton, transformers, accelerate, safetensors, tokenizers, numpy, pytest), and quantlib is imported from the tree
# through PYTHONPATH. What is missing there skips: LNQ's case (flash1dkmeans), flash_attention_2 (flash-attn).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "transformers", "accelerate", "safetensors", "tokenizers", "pytest", "flash_attn",
             "flash1dkmeans", "compressed_tensors"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", type(exc).__name__, exc)
EOF

tests=0
if [ -z "${SKIP_TESTS:-}" ]; then
    timeout 240 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs --durations=15 \
        --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
    tests=${PIPESTATUS[0]}
    timeout 60 "$PY" -m pytest -q tests/checkpoint/test_kernels.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/kernel-tests.log"
    kernels=${PIPESTATUS[0]}
    [ "$tests" = 0 ] && tests=$kernels
fi

timeout 280 "$PY" benchmarks/gpu_bench.py --record "$OUT/gpu_bench.jsonl" "$@" 2>&1 | tee "$OUT/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench (124: stopped at its time limit)"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
