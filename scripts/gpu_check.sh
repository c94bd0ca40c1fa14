#!/usr/bin/env bash
# The GPU check (issue #38), one command on a bare CUDA machine without network:
#   bash scripts/gpu_check.sh [--dry-run] [--sections a,b] [--budget SECONDS] [--out DIR]
# installs what the machine lacks from the wheels in .whl/ (scripts/fetch_wheels.sh) into a
# folder of its own (never touching the machine's torch), then runs scripts/gpu_check.py from
# the source tree: exactness in float16, speed and memory at full size, within the budget
# (360 s in all), written to docs/speed-gpu.{json,md}. --dry-run: the CPU, toy sizes, ~1-2 min.
set -euo pipefail

started="$(date +%s.%N)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
site="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/compose-gpu-check-site}"
wheels="$root/.whl"

if ! "$python" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; this check uses the machine's own torch (set PYTHON=...)" >&2
    exit 2
fi

# The modules of scripts/gpu-wheels.txt that neither the machine nor an earlier run provides.
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
missing=()
while read -r requirement module; do
    if ! "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
        missing+=("$requirement")
    fi
done < <(grep -v '^\s*#' "$root/scripts/gpu-wheels.txt" | awk 'NF')

if (( ${#missing[@]} )); then
    if [[ ! -d "$wheels" ]]; then
        echo "gpu_check: missing ${missing[*]} and no $wheels: run bash scripts/fetch_wheels.sh where there" \
             "is network, and carry .whl with the working tree" >&2
        exit 2
    fi
    if ! "$python" -m pip --version >/dev/null 2>&1; then
        echo "gpu_check: missing ${missing[*]}, and $python has no pip to install them from .whl" >&2
        exit 2
    fi
    echo "gpu_check: installing ${missing[*]} from .whl into $site" >&2
    # --no-deps: the list is complete (tests/test_gpu_check.py checks it), and pip must not
    # resolve anything against the machine's packages, torch above all.
    "$python" -m pip install --disable-pip-version-check --quiet --no-index --find-links "$wheels" --no-deps \
        --target "$site" "${missing[@]}"
fi

export TQDM_DISABLE=1  # progress bars would crowd the tables out of a captured tail
exec "$python" "$root/scripts/gpu_check.py" --started "$started" "$@"
