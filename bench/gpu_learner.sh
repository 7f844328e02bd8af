#!/usr/bin/env bash
# The learner at GPU scale (issue 23) as device calls of under 10 minutes each, results under $OUT.
#
# Prepare on the CPU machine (the device has CUDA torch but no transformers, pydantic, ... and no network):
#     .venv/bin/python scripts/gpu_wheels.py          # ~30 MB of CPython 3.12 wheels into .whl/ (git-ignored)
# Then, one stage per device call, carrying the wheels, in this order (each is cut at ~9 minutes; a session's 15
# device minutes hold about one and a half, so the stage that answers the goal comes first):
#     run(command="bash bench/gpu_learner.sh qwen3", carry=[".whl"], timeout_s=600)  # tests, Qwen3-0.6B, TF32 head
#     run(command="bash bench/gpu_learner.sh r1", carry=[".whl"], timeout_s=600)     # R1-Distill-1.5B, paper fit
#     run(command="bash bench/gpu_learner.sh flex", carry=[".whl"], timeout_s=600)   # packed rows under FlexAttention
# Every command has its own timeout and writes as it goes, so a stage cut short still brings back what it measured.
# Copy $OUT's files to bench/results/gpu-<card>-<date>/ and the figures into bench/README.md.
# A dry run of every path on a CPU (tiny models, rows 16x shorter, no MFU): SHRINK=1 OUT=/tmp/g bash bench/gpu_learner.sh qwen3
set -uo pipefail
stage=${1:?usage: bench/gpu_learner.sh qwen3|r1|flex}
out=${OUT:-/tmp/gpu-learner}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ! python3 -c "import transformers" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
python3 -c "import torch, transformers, pydantic, msgpack; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  || { echo "missing packages: run scripts/gpu_wheels.py here and carry .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee "$out/gpu-$stage.txt"
scale() {  # NAME TIMEOUT ARGS...: one bench/learner.py --scale run, its table and JSON under $out
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 bench/learner.py --scale ${SHRINK:+--shrink} --models-dir /tmp/prorl-scale-models \
    --json "$out/$name.json" "$@" \
    2>&1 | tee "$out/$name.txt"
}
case $stage in
  qwen3)
    # The learner's CUDA tests: FlexAttention trains packed rows as padded ones, a CUDA step matches the CPU's, TF32.
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/unit/test_prefix.py tests/unit/test_learner.py \
      2>&1 | tee "$out/tests-gpu.txt"
    scale qwen3-sdpa 240 --archs qwen3-0.6b --paper-fit '' --steps 2
    scale qwen3-tf32 150 --archs qwen3-0.6b --seqs 16384 --layouts sequence --paper-fit '' --steps 2 --set learner.tf32=true
    ;;
  r1)
    scale r1-sdpa 200 --archs r1-distill-qwen-1.5b --paper-fit '' --steps 1
    scale paper-fit 330 --archs none --paper-fit 8192,16384 --steps 1
    ;;
  flex)
    scale qwen3-flex 250 --archs qwen3-0.6b --paper-fit '' --steps 2 --set learner.attention=flex_attention
    scale paper-fit-flex 250 --archs none --paper-fit 8192 --steps 1 --set learner.attention=flex_attention
    ;;
  *)
    echo "unknown stage $stage (qwen3, r1 or flex)"
    exit 2
    ;;
esac
ls -la "$out"
