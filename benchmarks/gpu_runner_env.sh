# Sourced by the GPU runners (run_gpu_sglang.sh, run_gpu_tp2.sh, run_gpu_training.sh,
# run_gpu_gemma.sh) from the repo root: the staged wheels (scripts/gpu_env.sh) and the GPUs'
# names in the call's output (both skipped with SKIP_GPU_ENV=1: a rehearsal on the CPU),
# unbuffered Python output, $python (PYTHON, else python3) and $out (the device call's $OUT,
# else /tmp/out).
if [ "${SKIP_GPU_ENV:-0}" != 1 ]; then
  source scripts/gpu_env.sh || exit 1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
out=${OUT:-/tmp/out}
mkdir -p "$out"
