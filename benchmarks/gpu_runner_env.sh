# Sourced by the GPU runners (run_gpu_sglang.sh, run_gpu_tp2.sh) from the repo root: the staged
# wheels (scripts/gpu_env.sh), unbuffered Python output, $out (the device call's $OUT, else
# /tmp/out) and the GPUs' names in the call's output.
source scripts/gpu_env.sh || exit 1
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
