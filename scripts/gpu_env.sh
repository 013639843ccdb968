# Source at the start of every command on the GPU machine, from the repo root (the device call
# names `.whl` in carry: .whl/ is git-ignored and filled here by scripts/stage_gpu_wheels.sh;
# SGLang runs carry .whl-sgl instead, packed by scripts/stage_sglang_wheels.sh with FlashInfer in;
# runs that need only transformers and tokenizers, e.g. with a model carried beside, carry the
# smaller .whl-hf that scripts/stage_hf_site.sh cuts from it):
#     source scripts/gpu_env.sh && python3 -m pytest -q -m gpu tests
# 1. Installs the staged wheels into $TACTIC_SITE (default /tmp/site) once per machine (a stamp
#    per carried folder records its set) and puts that folder first on PYTHONPATH, so they win
#    over the machine's.
# 2. Installs the project editable without network or build isolation (setuptools is on the
#    machine): pyproject maps the top-level kernels/ to tactic_server.kernels, which plain
#    PYTHONPATH cannot do. Works under `set -u` in the caller; returns non-zero on failure.

_tactic_gpu_env() {
  local root site folder stamp wanted
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  site=${TACTIC_SITE:-/tmp/site}
  # one stamp per carried folder: a folder already installed on this machine is skipped
  for folder in "$root"/.whl*/; do
    compgen -G "$folder*.whl" >/dev/null || continue
    stamp=$site/.staged_$(basename "$folder")
    wanted=$(cd "$folder" && ls -l -- *.whl | awk '{print $5, $NF}')
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
      echo "[gpu_env] installing the wheels of $(basename "$folder") into $site"
      mkdir -p "$site"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$folder"*.whl || return 1
      printf '%s\n' "$wanted" >"$stamp"
    fi
  done
  # a packed site per carried folder (.whl-sgl: SGLang's; .whl-hf: transformers and tokenizers)
  for folder in "$root"/.whl*/; do
    [ -f "$folder/site.tar.xz" ] || continue
    stamp=$site/.staged_site_$(basename "$folder")
    wanted=$(stat -c %s "$folder/site.tar.xz")
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
      echo "[gpu_env] unpacking $(basename "$folder")/site.tar.xz into $site"
      mkdir -p "$site" && tar xJf "$folder/site.tar.xz" -C "$site" || return 1
      printf '%s\n' "$wanted" >"$stamp"
    fi
  done
  # an archive too large to travel beside the tree travels in parts, one carried folder each
  # (.whl-sgl-part1, .whl-sgl-part2: SGLang's site; .whl-fa3-part1 ...: sgl-kernel's FA3
  # library; scripts/split_site.sh), over calls issued while the machine stays warm; the parts
  # wait in $site.parts until every one their manifest (NAME.manifest: the archive's name and
  # sha256, then its parts) names is there, then the archive is unpacked into $site
  local parts=$site.parts manifest archive digest missing part
  for folder in "$root"/.whl*/; do
    compgen -G "$folder*.manifest" >/dev/null || continue
    mkdir -p "$parts" && cp "$folder"/* "$parts/" || return 1
  done
  for manifest in "$parts"/*.manifest; do
    [ -f "$manifest" ] || continue
    read -r archive digest <"$manifest"
    stamp=$site/.staged_parts_$archive
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && continue
    missing=0
    while read -r part; do
      [ -f "$parts/$part" ] || missing=$((missing + 1))
    done < <(tail -n +2 "$manifest")
    if [ "$missing" -gt 0 ]; then
      echo "[gpu_env] $missing part(s) of $archive still to come: carry them in the next call"
      continue
    fi
    echo "[gpu_env] unpacking $archive from its parts into $site"
    (cd "$parts" && tail -n +2 "$manifest" | xargs cat >"$archive") || return 1
    [ "$(sha256sum "$parts/$archive" | cut -d' ' -f1)" = "$digest" ] || {
      echo "[gpu_env] $archive: the parts do not add up (sha256)" >&2; return 1; }
    mkdir -p "$site" && tar xJf "$parts/$archive" -C "$site" || return 1
    printf '%s\n' "$digest" >"$stamp"
    (cd "$parts" && tail -n +2 "$manifest" | xargs rm -f && rm -f "$archive" "$manifest")
  done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c "import tactic_server.kernels" 2>/dev/null; then
    echo "[gpu_env] installing tactic-server editable"
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e "$root" || return 1
  fi
}
_tactic_gpu_env
