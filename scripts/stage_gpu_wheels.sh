#!/usr/bin/env bash
# Stages, on a machine with network access, the wheels the GPU machine needs to `import flashinfer`
# (FlashInfer 0.6.11.post1, JIT build, no cubin package). The GPU machine runs Python 3.12 on
# manylinux x86_64 and has no network: the wheels travel in `.whl/` at the repo root (ignored by
# git, so a device run names `.whl` in `carry`) and scripts/gpu_env.sh installs them there.
#
# Why only these two. flashinfer_python's Requires-Dist is: apache-tvm-ffi (>=0.1.6,<0.2, not
# 0.1.8), click, cuda-tile, einops, ninja, numpy, nvidia-cudnn-frontend>=1.13, nvidia-cutlass-dsl>=4.5,
# nvidia-ml-py, packaging>=24.2, requests, tabulate, torch, tqdm. The GPU machine already has
# click, einops, ninja, numpy, nvidia-ml-py (pynvml), packaging, requests, tabulate, torch, tqdm,
# and typing-extensions (apache-tvm-ffi's one requirement). cuda-tile, nvidia-cudnn-frontend and
# nvidia-cutlass-dsl are imported lazily (inside functions, or under contextlib.suppress /
# try-except ImportError) by the cuTile comm kernels, the cuDNN backends and the CuTe-DSL kernels,
# none of which `import flashinfer` or the FA2 paged decode/prefill path touches: `import flashinfer`
# was checked in a clean environment holding exactly the GPU machine's packages plus these two.
# STAGE_OPTIONAL=1 also fetches cuda-tile and nvidia-cudnn-frontend (12 MB) for code that wants them;
# nvidia-cutlass-dsl (hundreds of MB) is never staged.
#
# Idempotent: a wheel already in .whl/ is not fetched again; another version of a package pinned
# here is removed (two versions of one package stop the whole `pip install`).
# Usage: scripts/stage_gpu_wheels.sh        (PYTHON=python3 by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
dest=.whl
max_mb=40

wheels=(
  "flashinfer_python==0.6.11.post1" # pure Python + CUDA sources compiled by its JIT on first use
  "apache-tvm-ffi==0.1.9"           # cp312-abi3: the FFI through which flashinfer loads its JIT ops
)
if [ "${STAGE_OPTIONAL:-0}" = 1 ]; then
  wheels+=(
    "nvidia-cudnn-frontend==1.32.0" # flashinfer's cuDNN backends (cudnn_batch_decode_with_kv_cache)
    "cuda-tile==1.7.0"              # flashinfer.comm's cuTile all-gather matmul
  )
fi

# pip matches manylinux_2_N tags exactly: these are the GPU machine's, in order of preference.
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux1_x86_64)
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done

mkdir -p "$dest"
fetched=()
for spec in "${wheels[@]}"; do
  name=${spec%%==*}
  version=${spec##*==}
  # Wheel file names use the normalised project name: lower case, runs of -_. become _.
  norm=$(printf '%s' "$name" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g')
  for f in "$dest/${norm}"-*.whl; do
    [ -e "$f" ] || continue
    case "$(basename "$f")" in
      "${norm}-${version}-"*) ;;
      *)
        echo "[stage] removing other version $(basename "$f")"
        rm -f "$f"
        ;;
    esac
  done
  if compgen -G "$dest/${norm}-${version}-*.whl" >/dev/null; then
    echo "[stage] have  $(basename "$dest/${norm}-${version}-"*.whl)"
    continue
  fi
  echo "[stage] fetch $spec"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d "$dest" "$spec"
  fetched+=("$(basename "$dest/${norm}-${version}-"*.whl)")
done

if [ ${#fetched[@]} -gt 0 ]; then
  echo "[stage] fetched: ${fetched[*]}"
else
  echo "[stage] fetched nothing (all present)"
fi
echo "[stage] wheels in $dest/:"
ls -l "$dest"/*.whl | awk '{printf "  %10d  %s\n", $5, $NF}'
total_kb=$(du -sk "$dest" | cut -f1)
echo "[stage] total: $(du -sh "$dest" | cut -f1) ($total_kb KiB)"
if [ "$total_kb" -gt $((max_mb * 1024)) ]; then
  echo "[stage] WARNING: over ${max_mb} MB; a device run carries at most 64 MiB in all" >&2
fi
echo "[stage] on the GPU machine (run with carry=[\".whl\"]), or source scripts/gpu_env.sh:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
  "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
