#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels SGLang 0.5.12.post1 needs on the GPU machine
# (Python 3.12, torch 2.11 + triton 3.6 already there; recipe: ../shared/research/
# sglang_gpu_staging.md), installs them with FlashInfer's (.whl, from scripts/stage_gpu_wheels.sh)
# into a folder for that platform and packs it as .whl-sgl/site.tar.xz (git-ignored, about
# 57 MiB: the wheels themselves are 104 MB, over the 64 MiB a device call carries). A device call
# names `.whl-sgl` in carry; `source scripts/gpu_env.sh` there unpacks it once per machine.
# sgl-kernel's FA3 library (sgl_kernel/flash_ops.abi3.so, SGLang's fa3 backend: 1022 MiB, 260 MiB
# deflated in the wheel) is left out of the site; with STAGE_FA3=1 it is packed on its own as
# .whl-fa3/flash_ops.tar.xz and split (scripts/split_site.sh) into .whl-fa3-part1/ ... of at most
# FA3_PART_MIB (default 28) each, to carry one a call beside the tree, back to back after the
# site's parts (about 8 calls, each within the 30 s the machine keeps /tmp); gpu_env.sh unpacks
# it into the site once every part has come.
# Usage: bash scripts/stage_gpu_wheels.sh && [STAGE_FA3=1] bash scripts/stage_sglang_wheels.sh
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
if [ "${STAGE_FA3:-0}" = 1 ]; then
  rm -rf "$stage/fa3" .whl-fa3 && mkdir -p "$stage/fa3" .whl-fa3
  python3 - "$stage" <<'PY'
import glob, sys, zipfile
stage = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{stage}/raw/sglang_kernel-0.4.2.post2-*.whl")[0]) as wheel:
    for item in wheel.namelist():
        if item.startswith("sgl_kernel/flash_ops"):
            wheel.extract(item, f"{stage}/fa3")
PY
  echo "[stage] packing $(du -sh "$stage/fa3" | cut -f1) of FA3 into .whl-fa3/flash_ops.tar.xz"
  tar cf - -C "$stage/fa3" . | xz -T0 -6 >.whl-fa3/flash_ops.tar.xz
  size=$(stat -c %s .whl-fa3/flash_ops.tar.xz)
  part=$(python3 -c "print(int(${FA3_PART_MIB:-28} * 2**20))")
  parts=$(( (size + part - 1) / part )) && parts=$(( parts < 2 ? 2 : parts ))
  PARTS=$parts PART1_MIB=${FA3_PART_MIB:-28} \
    bash scripts/split_site.sh .whl-fa3/flash_ops.tar.xz .whl-fa3-part fa3-flash-ops.tar.xz
  echo "[stage] FA3: $((size / 1048576)) MiB in $parts parts, .whl-fa3-part1 to $parts"
fi
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
