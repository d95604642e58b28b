#!/bin/sh
# Sets up what the tests need, for `make test` (when .venv/ is missing or
# tests/requirements.txt changed) and for .ci/run, so that the two cannot drift:
#   1. Debian's packages: torch 1.13, numpy, sentencepiece, pytest, valgrind,
#      chromium (tests/test_explain.py renders make explain's page in it),
#      SIMDe (the AVX-512 kernels emulated, tests/test_kernels.py) and the
#      venv module; installed with apt-get when running as root or with
#      password-less sudo, else named in a one-line instruction.
#   2. A project-local virtual environment, .venv/, that sees those packages,
#      with the pinned PyPI packages of tests/requirements.txt.
# The environment is built on Debian's /usr/bin/python3, the one its packages
# are for, even when another python3 comes first on the PATH. On a machine
# without apt-get, python3 must already import torch, numpy, sentencepiece
# and pytest.
set -eu
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES="python3-venv python3-pip python3-torch python3-numpy python3-sentencepiece
python3-pytest python3-protobuf valgrind chromium libsimde-dev"

say() { echo "setup: $*" >&2; }

missing_debian_packages() {
    for p in $DEBIAN_PACKAGES; do
        dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || printf ' %s' "$p"
    done
}

if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    python=/usr/bin/python3
    missing=$(missing_debian_packages)
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ]; then
            as_root=""
        elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            as_root="sudo"
        else
            say "the tests need Debian packages; install them, then run make test again:" \
                "sudo apt-get install$missing"
            exit 1
        fi
        say "installing Debian packages:$missing"
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
else
    python=python3
fi
if ! "$python" -c "import torch, numpy, sentencepiece, pytest" 2>/dev/null; then
    say "the tests need $python with torch, numpy, sentencepiece and pytest" \
        "(pip install torch numpy sentencepiece pytest), then run make test again"
    exit 1
fi

say "creating .venv/ with the pinned packages of tests/requirements.txt"
rm -f .venv/ready
"$python" -m venv --clear --system-site-packages .venv
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
touch .venv/ready
