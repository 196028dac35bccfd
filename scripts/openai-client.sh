#!/usr/bin/env bash
# Installs the official `openai` Python package from PyPI, pinned, into a virtual environment under
# $COMPUTEPOOL_CACHE/openai/VERSION and prints its python. Idempotent: a second run only prints the path.
# `make test` uses it to run a real OpenAI client against `computepool up`
# (host/node/tests/openai_client.rs).
set -euo pipefail
VERSION=3.51.0
CACHE="${COMPUTEPOOL_CACHE:-$HOME/.cache/computepool}"
VENV="$CACHE/openai/$VERSION"
if [[ -x "$VENV/bin/python" && -f "$VENV/.complete" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$VERSION" >&2
"$VENV/bin/python" -c "import openai, sys; assert openai.__version__ == sys.argv[1], openai.__version__" "$VERSION" >&2
touch "$VENV/.complete"
echo "$VENV/bin/python"
