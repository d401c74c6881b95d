#!/usr/bin/env bash
# Every GPU measurement the project has, in one command, on a machine with a CUDA GPU (about 6 minutes on one
# H100): the trainer's speed (train_speed.py), fused trials' throughput (fused.py), and a short study in
# CIFAR-10's format, fused and compiled (gpu_study.py). Rows go into benchmarks/RESULTS.md and
# benchmarks/FUSED.md. Run from anywhere:  bash benchmarks/gpu.sh
# Where optuna and mlflow are missing (the lent GPU machine), it installs the wheels that
# ../shared/tools/device-wheels.sh put in .whl/ (carry .whl with the run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if ! "$PY" -c "import optuna, mlflow" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu.sh: optuna/mlflow missing and no .whl/ to install them from" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "gpu.sh: torch sees no CUDA device here" >&2; exit 2; }
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
stamp=$(date +%Y-%m-%d)
log=$(mktemp -d)

echo "== train_speed ($device)"
timeout 240 "$PY" benchmarks/train_speed.py --device cuda --n 50000 --width 64 --compile reduce-overhead \
  --batch-sizes 32,512,4096 | tee "$log/train_speed.md" || echo "train_speed: failed or timed out" | tee -a "$log/train_speed.md"
echo "== fused ($device)"
timeout 150 "$PY" benchmarks/fused.py --device cuda || echo "fused: failed or timed out (FUSED.md keeps what it wrote)"
echo "== study in CIFAR-10's format ($device)"
timeout 150 "$PY" benchmarks/gpu_study.py --device cuda | tee "$log/study.md" \
  || echo "gpu_study: failed or timed out" | tee -a "$log/study.md"

# RESULTS.md: this run's GPU section replaces the previous one (or the "not measured" placeholder).
"$PY" - "$device" "$stamp" "$log" <<'PY'
import re, sys
from pathlib import Path
device, stamp, log = sys.argv[1], sys.argv[2], Path(sys.argv[3])
path = Path("benchmarks/RESULTS.md")
text = path.read_text()
body = (f"## GPU ({device}), {stamp}\n\nBy `bash benchmarks/gpu.sh`.\n\n"
        f"{(log / 'train_speed.md').read_text().strip()}\n\n### A short study in CIFAR-10's format, fused and "
        f"compiled (benchmarks/gpu_study.py)\n\n{(log / 'study.md').read_text().strip()}\n\n")
m = re.search(r"^## GPU.*?(?=^## |\Z)", text, flags=re.M | re.S)
text = text[:m.start()] + body + text[m.end():] if m else text.rstrip() + "\n\n" + body
path.write_text(text)
print(f"written: {path}, benchmarks/FUSED.md")
PY
