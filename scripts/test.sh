#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the plain pip install (scripts/check_install.sh), check the import
# layers (lint-imports), and run the whole test suite, notebooks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The install a user does without the script: pip install . + lens prepare + a census, in a fresh venv.
bash scripts/check_install.sh
# Imports run one way, from the application down to the core, with no cycles ([tool.importlinter] in pyproject.toml).
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
