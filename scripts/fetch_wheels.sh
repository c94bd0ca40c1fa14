#!/usr/bin/env bash
# Download, on a machine with network, the wheels that scripts/gpu_check.sh installs on a bare
# CUDA machine without it (scripts/gpu-wheels.txt), for CPython 3.12 on manylinux x86-64,
# into .whl/ (git-ignored; carry it to the GPU machine with the working tree).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dest="${1:-$root/.whl}"
mapfile -t requirements < <(grep -v '^\s*#' "$root/scripts/gpu-wheels.txt" | awk 'NF {print $1}')

mkdir -p "$dest"
echo "fetch_wheels: ${requirements[*]} -> $dest" >&2
# --no-deps: the list names every wheel needed (the bare machine has the rest); several
# platform tags because manylinux wheels (Pillow's) are tagged 2_27/2_28, not only 2014.
"$python" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$dest" "${requirements[@]}"

total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "fetch_wheels: $(ls "$dest"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $dest" >&2
if (( total > 64 * 1024 * 1024 )); then
    echo "fetch_wheels: more than 64 MiB, more than the GPU machine is sent" >&2
    exit 1
fi
