#!/usr/bin/env bash
# `pip install .` into a fresh venv that already has torch must not touch torch, and the `cpp`
# backend must work there after its first-use build (`make check-install`; not run by CI).
#
#   1. a fresh venv (no --system-site-packages) with torch==$TORCH (default 2.14.1) from pip;
#   2. a plain `pip install .` of this checkout (build isolation: no torch in the build
#      environment, so no extension ahead of time);
#   3. torch's version and its installed files must be unchanged, and pip must not have
#      collected torch;
#   4. outside the checkout, with an empty TORCH_EXTENSIONS_DIR: the cpp backend compiles itself
#      once, matches the torch backend, and a second process loads that build without compiling.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TORCH=${TORCH:-2.14.1}
WORK=${WORK:-$(mktemp -d /tmp/rlrp-check-install.XXXXXX)}
V=$WORK/venv
export PIP_DISABLE_PIP_VERSION_CHECK=1

secs() { date +%s.%N; }
python3 -m venv "$V"
t0=$(secs)
"$V/bin/python" -m pip install -q "torch==$TORCH" > "$WORK/torch.log" 2>&1
t1=$(secs)
printf 'torch==%s into a fresh venv: %.0f s\n' "$TORCH" "$(echo "$t1 - $t0" | bc)"

torch_state() {  # version, and a fingerprint of every file pip recorded for torch
    "$V/bin/python" - <<'PY'
import hashlib, importlib.metadata as md, os
dist = md.distribution("torch")
h = hashlib.sha256()
for f in sorted(dist.files, key=str):
    p = dist.locate_file(f)
    st = os.stat(p) if os.path.exists(p) else None
    h.update(f"{f}:{st and (st.st_size, st.st_mtime_ns, st.st_ino)}\n".encode())
print(dist.version, h.hexdigest())
PY
}
before=$(torch_state)
t0=$(secs)
(cd "$WORK" && "$V/bin/python" -m pip install "$REPO") > "$WORK/pip.log" 2>&1
t1=$(secs)
after=$(torch_state)
printf 'pip install . (build isolation): %.0f s\n' "$(echo "$t1 - $t0" | bc)"
grep -E '^(Requirement already satisfied: torch|Installing collected packages|Successfully installed)' \
    "$WORK/pip.log" | sed 's/^/  pip: /'
if grep -qiE '^(Collecting|Downloading|Processing) .*torch-?[0-9=]' "$WORK/pip.log" \
        || [ "$before" != "$after" ]; then
    echo "FAIL: pip touched torch (before: $before, after: $after); log: $WORK/pip.log"
    exit 1
fi
echo "torch untouched: ${after%% *} (same files, same inodes and mtimes)"

probe='
import logging, time, torch, rlrp_fast
from rlrp_fast.backends import unavailable_reason
t = time.perf_counter()
reason = unavailable_reason("cpp")
took = time.perf_counter() - t
assert reason is None, reason
import rlrp_fast.backends.cpp_backend as cb
assert not hasattr(rlrp_fast, "_C") and "site-packages" in cb.__file__, cb.__file__
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 5)).eval()
x = torch.randn(2, 3, 8, 8)
r_cpp = rlrp_fast.Explainer(model, backend="cpp").explain(x).relevance
r_torch = rlrp_fast.Explainer(model, backend="torch").explain(x).relevance
err = ((r_cpp - r_torch).abs().sum() / r_torch.abs().sum()).item()
assert err < 1e-5, err
print(f"cpp backend ready in {took:.1f} s, relative L1 to torch backend {err:.1e}")
'
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
(cd "$WORK" && "$V/bin/python" -c "$probe" 2> "$WORK/first.err") | sed 's/^/  first use: /'
sed 's/^/  first use (stderr): /' "$WORK/first.err"
(cd "$WORK" && "$V/bin/python" -c "$probe" 2> "$WORK/second.err") | sed 's/^/  second use: /'
if grep -q 'compiling' "$WORK/second.err"; then
    echo "FAIL: the second process compiled again"; exit 1
fi
echo "OK (work folder: $WORK)"
