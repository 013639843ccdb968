#!/usr/bin/env bash
# Cuts from .whl-sgl/site.tar.xz (scripts/stage_sglang_wheels.sh) the packed site of a run that
# needs transformers and tokenizers but not SGLang (training, benchmarks/accuracy.py): about
# 10 MB instead of 57, so that a device call can carry a trained model beside it within 64 MiB.
# accelerate (pure Python, not in SGLang's site) is added: `tactic-server models pull --gguf`
# converts Gemma 3 on the GPU machine with the [models] extra.
#   bash scripts/stage_hf_site.sh   ->   .whl-hf/site.tar.xz (git-ignored)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .whl-sgl/site.tar.xz ] || { echo "run scripts/stage_sglang_wheels.sh first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xJf .whl-sgl/site.tar.xz -C "$work"
(cd "$work" && rm -rf flashinfer* sglang* mistral_common* jedi* pycountry* cudnn* nvidia_cudnn* \
  sgl_kernel* torchao* tvm_ffi* apache_tvm* openai_harmony* llguidance* torchcodec* IPython* \
  ipython* flash_attn* _soundfile* soundfile* torch_memory_saver* _mscclpp* include xgrammar* \
  outlines* compressed_tensors* prompt_toolkit* openai openai-* pyzmq* zmq* decord* av av.libs* \
  cuda cuda_* nvidia* triton* kernels kernels-*)
python3 -m pip install -q --no-deps --no-compile --target "$work" "accelerate==${ACCELERATE:-1.15.0}"
mkdir -p .whl-hf
tar cJf .whl-hf/site.tar.xz -C "$work" .
ls -l .whl-hf/site.tar.xz
