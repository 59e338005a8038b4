#!/usr/bin/env bash
# Build the kernels with AddressSanitizer and UndefinedBehaviorSanitizer (gcc or clang) in a
# copy of the tree, and run the test suite against that build. Any report stops the run with a
# non-zero status (-fno-sanitize-recover=all, halt_on_error=1).
#
#   bash scripts/sanitize.sh                 # the whole suite (tests/)
#   bash scripts/sanitize.sh tests/test_kernels.py -x    # arguments go to pytest
#
# Needs: the test extras (pip install -e ".[test]"), git, and the compiler's libasan.
# Leaks are not checked here (CPython itself keeps memory until exit); tests/test_memory.py
# checks that resident memory stays flat instead. The tests that measure resident memory are
# left out (marker `rss`): ASan's shadow memory and quarantine change what they measure.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${NORMCORE_SANITIZE_DIR:-$(mktemp -d /tmp/normcore-sanitize.XXXXXX)}"
cc="${CC:-gcc}"
echo "sanitize: copying the tree to $work"
mkdir -p "$work"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$repo" && xargs -0 cp --parents -t "$work")
cd "$work"
# In the installed package plugins/ is normcore.plugins; here the tree is used as it is.
ln -sfn ../plugins normcore/plugins
echo "sanitize: building with -fsanitize=address,undefined"
NORMCORE_SANITIZE=address,undefined CC="$cc" python setup.py -q build_ext --inplace -j "$(nproc)" >build.log 2>&1 \
    || { tail -40 build.log; exit 1; }
libasan="$("$cc" -print-file-name=libasan.so)"
libstdcxx="$("$cc" -print-file-name=libstdc++.so.6)"
[ -f "$libasan" ] || { echo "sanitize: $cc has no libasan.so" >&2; exit 1; }
# The interpreter is not instrumented: ASan's runtime must be loaded before anything else, and
# libstdc++ with it, or ASan cannot intercept C++ exceptions thrown by C++ extensions that
# the tests import (matplotlib, torch).
export LD_PRELOAD="$libasan${libstdcxx:+ $libstdcxx}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:detect_odr_violation=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
python - <<'PY'
import normcore, os, sys
from normcore._kernels import moments
assert normcore.__file__.startswith(os.getcwd()), f"imported {normcore.__file__}, not the sanitized build"
print("sanitize: testing", os.path.dirname(normcore.__file__))
PY
python -m pytest -p no:cacheprovider -q -m "not slow and not rss" "${@:-tests}"
echo "sanitize: clean"
