#!/usr/bin/env bash
# The CUDA path, proven on a machine with an NVIDIA GPU: the tests, a --quick run and the full
# default run with --device cuda, then bench/results/gpu.md: wall time, training images/s and
# peak GPU memory per model, and test metrics beside the committed CPU run (outputs/metrics.json).
#
#   bash bench/gpu_check.sh [DATA_DIR]      # DATA_DIR holds pneumoniamnist.npz; ~5 minutes
#
# On a machine without CUDA it runs nothing, says so and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}

if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA device on this machine (or torch is not installed), so nothing was" \
       "run and bench/results/gpu.md is unchanged. Run it where 'nvidia-smi' lists a GPU," \
       "after 'pip install -r requirements.txt'." >&2
  exit 2
fi
if [ ! -f "$data/pneumoniamnist.npz" ]; then
  echo "gpu_check: $data/pneumoniamnist.npz not found; pass the folder that holds it." >&2
  exit 2
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python -m pip install -q -r requirements.txt pytest
start=$(date +%s)
python -m pytest -q 2>&1 | tail -n 1 | tee "$out/pytest.txt"
tests_s=$(( $(date +%s) - start ))
for run in quick full; do
  flags=(--device cuda --data-dir "$data" --outputs "$out/$run")
  [ "$run" = quick ] && flags+=(--quick)
  start=$(date +%s)
  python hw5_dl.py "${flags[@]}" > "$out/$run.log"
  echo $(( $(date +%s) - start )) > "$out/$run.seconds"
  tail -n 1 "$out/$run.log"
done

python - "$out" "$tests_s" <<'PY'
import json, sys, time
from pathlib import Path
import torch

out, tests_s = Path(sys.argv[1]), sys.argv[2]
gpu = json.loads((out / "full" / "metrics.json").read_text())
cpu = json.loads(Path("outputs/metrics.json").read_text())
wall = {run: (out / f"{run}.seconds").read_text().strip() for run in ("quick", "full")}
lines = [f"# CUDA check ({time.strftime('%Y-%m-%d')})", "",
         f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA "
         f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; TF32 on, no autocast.",
         "Command: `bash bench/gpu_check.sh`", "",
         f"- Tests: {(out / 'pytest.txt').read_text().strip()} ({tests_s} s)",
         f"- `--quick --device cuda`: {wall['quick']} s; default run `--device cuda`: "
         f"{wall['full']} s wall ({gpu['total_seconds']} s inside the script); the committed "
         f"CPU run: {cpu['total_seconds']} s on {cpu['threads']} threads.", "",
         "| model | device | epochs (restored) | train s | training images/s | peak GPU GB "
         "| test ACC | test AUC | val AUC |", "|---|---|---|---|---|---|---|---|---|"]
for name, m in gpu["models"].items():
    for device, run in (("cuda", m), ("cpu", cpu["models"].get(name, {}))):
        if run.get("status") != "trained" or "history" not in run:
            continue
        lines.append(f"| {name} | {device} | {run['epochs_trained']}/{run.get('max_epochs', '?')} "
                     f"({run['best_epoch']}) | {run['train_seconds']:.0f} | "
                     f"{run.get('train_images_per_second', float('nan')):,.0f} | "
                     f"{run.get('peak_gpu_memory_gb', '')} | {run['test']['accuracy']:.3f} | "
                     f"{run['test']['auc']:.3f} | {run['val']['auc']:.4f} |")
lines += ["", f"Chosen on validation: cuda {gpu['best_model']}, cpu {cpu['best_model']}. "
          "Same seed, other hardware: the data order and the initial weights match the CPU run, "
          "but augmentation and dropout draw from the GPU's own random generator and cuDNN sums "
          "in another order, so the numbers differ as another seed's would (bench/results/"
          "recipe.md has the spread over seeds)."]
Path("bench/results/gpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
print("\n".join(lines))
PY
echo "gpu_check: wrote bench/results/gpu.md"
