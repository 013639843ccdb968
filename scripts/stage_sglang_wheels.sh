#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels SGLang 0.5.12.post1 needs on the GPU machine
# (Python 3.12, torch 2.11 + triton 3.6 already there; recipe: ../shared/research/
# sglang_gpu_staging.md), installs them with FlashInfer's (.whl, from scripts/stage_gpu_wheels.sh)
# into a folder for that platform and packs it as .whl-sgl/site.tar.xz (git-ignored, about
# 57 MiB: the wheels themselves are 104 MB, over the 64 MiB a device call carries). A device call
# names `.whl-sgl` in carry; `source scripts/gpu_env.sh` there unpacks it once per machine.
# Usage: bash scripts/stage_gpu_wheels.sh && bash scripts/stage_sglang_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=/tmp/sgl-stage
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any)
get() { python3 -m pip download -q --no-deps "${platform[@]}" -d "$stage/all" "$@"; }
mkdir -p "$stage/all" "$stage/raw"
get "sglang==0.5.12.post1"
python3 -m pip download -q --no-deps "${platform[@]}" -d "$stage/raw" "sglang-kernel==0.4.2.post2"
# sglang-kernel without the FA3/FlashMLA/sm100 binaries and bundled CUDA libraries (Llama-family
# models on the triton or tactic backends do not use them): repacked as a smaller wheel
python3 - "$stage" <<'PY'
import glob, sys, zipfile
stage = sys.argv[1]
source = glob.glob(f"{stage}/raw/sglang_kernel-0.4.2.post2-*.whl")[0]
target = f"{stage}/all/" + source.split("/")[-1]
drop = ("sgl_kernel/flash_ops", "sgl_kernel/flashmla_ops", "sgl_kernel/sm100/", "lib/", "lib64/",
        "include/", "sgl_kernel/_mscclpp")
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not item.filename.startswith(drop) and "/_mscclpp" not in item.filename:
            zout.writestr(item, zin.read(item.filename))
PY
get "transformers==5.6.0" "tokenizers==0.22.2" "openai==2.6.1" "openai-harmony==0.0.4" \
  "soundfile==0.13.1" "torchao==0.17.0" "kernels==0.12.3" "torchcodec==0.11.1" \
  "cuda-tile==1.7.0" "flash-attn-4==4.0.0b15" "nvidia-cudnn-frontend==1.28.0" \
  fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn orjson \
  pyzmq msgspec setproctitle pybase64 partial-json-parser interegular python-multipart \
  compressed-tensors llguidance torch_memory_saver blobfile gguf ipython traitlets jedi parso \
  prompt-toolkit decorator matplotlib-inline pexpect ptyprocess stack-data executing asttokens \
  pure-eval wcwidth ipython-pygments-lexers dill email-validator dnspython jsonschema \
  jsonschema-specifications referencing rpds-py loguru mistral-common pycountry \
  pydantic-extra-types opentelemetry-api importlib-metadata watchfiles jiter distro sniffio cffi \
  pycparser easydict
rm -rf "$stage/site" .whl-sgl-a .whl-sgl-b
mkdir -p "$stage/site" .whl-sgl
python3 -m pip install -q --no-index --no-deps --no-compile "${platform[@]}" --target "$stage/site" \
  .whl/*.whl "$stage"/all/*.whl
echo "[stage] packing $(du -sh "$stage/site" | cut -f1) into .whl-sgl/site.tar.xz"
tar cf - -C "$stage/site" . | xz -T0 -6 >.whl-sgl/site.tar.xz
size=$(stat -c %s .whl-sgl/site.tar.xz)
echo "[stage] .whl-sgl/site.tar.xz: $((size / 1048576)) MiB"
if [ "$size" -gt $((60 * 1048576)) ]; then
  echo "[stage] over 60 MiB: with the working tree it would not fit one device call" >&2
  exit 1
fi
