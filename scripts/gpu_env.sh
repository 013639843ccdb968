# Source at the start of every command on the GPU machine, from the repo root (the device call
# names `.whl` in carry: .whl/ is git-ignored and filled here by scripts/stage_gpu_wheels.sh):
#     source scripts/gpu_env.sh && python3 -m pytest -q -m gpu tests
# 1. Installs the staged wheels into $TACTIC_SITE (default /tmp/site) once per machine (a stamp
#    records the set) and puts that folder first on PYTHONPATH, so they win over the machine's.
# 2. Installs the project editable without network or build isolation (setuptools is on the
#    machine): pyproject maps the top-level kernels/ to tactic_server.kernels, which plain
#    PYTHONPATH cannot do. Works under `set -u` in the caller; returns non-zero on failure.

_tactic_gpu_env() {
  local root site stamp wanted
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  site=${TACTIC_SITE:-/tmp/site}
  stamp=$site/.tactic_staged_wheels
  if compgen -G "$root/.whl/*.whl" >/dev/null; then
    wanted=$(cd "$root/.whl" && ls -l -- *.whl | awk '{print $5, $NF}')
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
      echo "[gpu_env] installing the staged wheels into $site"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$root"/.whl/*.whl || return 1
      printf '%s\n' "$wanted" >"$stamp"
    fi
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c "import tactic_server.kernels" 2>/dev/null; then
    echo "[gpu_env] installing tactic-server editable"
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e "$root" || return 1
  fi
}
_tactic_gpu_env
