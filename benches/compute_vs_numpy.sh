#!/usr/bin/env bash
# `vcid compute` (whole process, all metrics) against a numpy float64 script
# that computes only VCI (benches/numpy_vci.py), on the same 65,536 x 1,024
# float32 .npy file with 100 classes, side by side in one run.
#
# Usage: benches/compute_vs_numpy.sh [repetitions]   (default 3)
# Env:   PYTHON (default .venv/bin/python, needs numpy), BENCH_DIR (default
#        /tmp/vcid_bench; the 256 MiB input is generated there once).
#
# Each command runs once untimed (page cache warm for both), then the two
# alternate, so background load hits both alike. /usr/bin/time reports wall
# and CPU seconds and peak memory of the whole process.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${1:-3}
PYTHON=${PYTHON:-.venv/bin/python}
DIR=${BENCH_DIR:-/tmp/vcid_bench}
X="$DIR/X.npy"
Y="$DIR/y.npy"
VCID=target/release/vcid

mkdir -p "$DIR"
if [[ ! -f "$X" || ! -f "$Y" ]]; then
    echo "generating $X (65536 x 1024 float32, 100 classes) ..."
    "$PYTHON" - "$X" "$Y" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(1)
n, d, k = 65536, 1024, 100
means = rng.normal(scale=0.5, size=(k, d)).astype(np.float32)
y = rng.integers(0, k, size=n)
X = means[y] + rng.standard_normal((n, d), dtype=np.float32)
np.save(sys.argv[1], X)
np.save(sys.argv[2], y)
EOF
fi

# --all-targets: the feature set `cargo test --release` uses, so the two share
# one build (a plain `cargo build --release` recompiles every dependency).
cargo build --release --all-targets --quiet

vcid_cmd=("$VCID" compute --features "$X" --labels "$Y" --format json)
numpy_cmd=("$PYTHON" benches/numpy_vci.py "$X" "$Y")

# Both must agree on the number before their times mean anything.
vci_vcid=$("${vcid_cmd[@]}" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["vci"])')
vci_numpy=$("${numpy_cmd[@]}")
echo "VCI  vcid: $vci_vcid  numpy: $vci_numpy"
"$PYTHON" -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); d=abs(a-b)/abs(b); print(f'relative difference {d:.1e}'); sys.exit(d > 1e-9)" "$vci_vcid" "$vci_numpy"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-6s %-4s %8s %8s %8s %9s\n' tool rep wall_s user_s sys_s maxrss_MB
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
declare -a walls_vcid walls_numpy
for ((r = 1; r <= REPS; r++)); do
    for tool in vcid numpy; do
        if [[ $tool == vcid ]]; then cmd=("${vcid_cmd[@]}"); else cmd=("${numpy_cmd[@]}"); fi
        /usr/bin/time -f '%e %U %S %M' -o "$tmp" "${cmd[@]}" > /dev/null
        read -r wall user sys rss < "$tmp"
        printf '%-6s %-4s %8s %8s %8s %9d\n' "$tool" "$r" "$wall" "$user" "$sys" $((rss / 1024))
        if [[ $tool == vcid ]]; then walls_vcid+=("$wall"); else walls_numpy+=("$wall"); fi
    done
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mv=$(median "${walls_vcid[@]}")
mn=$(median "${walls_numpy[@]}")
echo "median wall: vcid ${mv}s  numpy ${mn}s  (numpy/vcid = $(awk -v a="$mn" -v b="$mv" 'BEGIN{printf "%.2f", a/b}'))"
