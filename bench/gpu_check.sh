#!/usr/bin/env bash
# The CUDA path, proven on a machine with an NVIDIA GPU: the tests, a --quick run with CUDA's sync
# debug mode on, and the full default run with --device cuda; then bench/results/gpu.md: wall time
# and training time per model, test metrics beside the committed CPU run
# (outputs/metrics.json), and the host-device synchronisations inside the training loop.
#
#   bash bench/gpu_check.sh [DATA_DIR] [COPY_TO]
#
# DATA_DIR holds pneumoniamnist.npz (default: .gpu/ when bench/gpu_prepare.sh has filled it, else
# data/). COPY_TO, when given, receives gpu.md and the logs as well, for a machine whose disk is
# discarded after the run (a Colab or cloud session). Offline: with .gpu/wheels present
# (bench/gpu_prepare.sh) the missing packages install from it with --no-index; without it, from
# PyPI via requirements.txt. Each step has its own time limit, 7 minutes in all at the most.
# On a machine without CUDA it runs nothing, says so and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
data=${1:-$( [ -f .gpu/pneumoniamnist.npz ] && echo .gpu || echo data )}
copy_to=${2:-}

if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA device on this machine (or torch is not installed), so nothing was" \
       "run and bench/results/gpu.md is unchanged. Run it where 'nvidia-smi' lists a GPU." >&2
  exit 2
fi
if [ ! -f "$data/pneumoniamnist.npz" ]; then
  echo "gpu_check: $data/pneumoniamnist.npz not found; pass the folder that holds it, or run" \
       "bench/gpu_prepare.sh first." >&2
  exit 2
fi

out=$(mktemp -d)
if [ -d .gpu/wheels ]; then      # no network: beside what is installed, never over it
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$out/site" \
    .gpu/wheels/*.whl $(ls .gpu/deps/*.whl 2>/dev/null) || exit 2
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
else
  "$py" -m pip install -q -r requirements.txt pytest || exit 2
fi
if ! "$py" -c "import medmnist.dataset, pytorch_grad_cam" 2> "$out/import.log"; then
  echo "gpu_check: medmnist or grad-cam does not import ($(tail -n 1 "$out/import.log")); fill" \
       ".gpu/deps with bench/gpu_prepare.sh and carry it too." >&2
  exit 2
fi

step() {   # step NAME LIMIT_S COMMAND...: run it, keep its log, exit code and seconds
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo $? > "$out/$name.rc"
  echo $(( SECONDS - start )) > "$out/$name.seconds"
  echo "$name: exit $(cat "$out/$name.rc") in $(cat "$out/$name.seconds") s; $(tail -n 1 "$out/$name.log")"
}
step tests 150 "$py" -m pytest -q -p no:cacheprovider
export SYNCS="$out/syncs.json"
step quick 60 "$py" - --quick --device cuda --data-dir "$data" --outputs "$out/quick" <<'PY'
# hw5_dl.main under CUDA's sync debug mode: every host-device synchronisation is counted under
# the innermost hw5_dl function (and line) that caused it.
import collections, json, os, sys, traceback, warnings
import torch
sys.path.insert(0, ".")
import hw5_dl

syncs, show = collections.Counter(), warnings.showwarning
def record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return show(message, category, filename, lineno, file, line)
    frames = [f for f in traceback.extract_stack() if f.filename.endswith("hw5_dl.py")]
    syncs[f"{frames[-1].name}:{frames[-1].lineno}" if frames else "outside hw5_dl"] += 1
warnings.showwarning = record
warnings.simplefilter("always")
torch.cuda.set_sync_debug_mode("warn")
code = hw5_dl.main(sys.argv[1:])
torch.cuda.set_sync_debug_mode(0)
json.dump(syncs, open(os.environ["SYNCS"], "w"), indent=1)
print(f"{sum(syncs.values())} synchronisations; by place: {dict(syncs.most_common())}")
sys.exit(code)
PY
step full 240 "$py" hw5_dl.py --device cuda --data-dir "$data" --outputs "$out/full"

"$py" - "$out" <<'PY'
import json, sys, time
from pathlib import Path
import torch

out = Path(sys.argv[1])
def result(name):
    rc, seconds = ((out / f"{name}.{k}").read_text().strip() for k in ("rc", "seconds"))
    last = (out / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
    return f"exit {rc} in {seconds} s ({last[0][:120]})"
lines = [f"# CUDA check ({time.strftime('%Y-%m-%d')})", "",
         f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA "
         f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; no autocast.",
         "Command: `bash bench/gpu_check.sh` (bench/README.md, CUDA)", "",
         f"- Tests: {result('tests')}",
         f"- `--quick --device cuda` under CUDA's sync debug mode: {result('quick')}",
         f"- Default run `--device cuda`: {result('full')}"]
syncs = json.loads((out / "syncs.json").read_text()) if (out / "syncs.json").exists() else {}
epochs = sum(len(m.get("history", [])) for m in json.loads(
    (out / "quick" / "metrics.json").read_text())["models"].values()) \
    if (out / "quick" / "metrics.json").exists() else 0
loop = {k: n for k, n in syncs.items() if k.startswith(("train_epoch", "augment", "standardize"))}
lines += [f"- Host-device synchronisations in the quick run: {sum(syncs.values())} in all; inside "
          f"the training loop {sum(loop.values())} over {epochs} epochs ({loop or 'none'}): "
          "train_epoch reads the loss and the hits once per step (loss.item()), the plain "
          "idiom. All places: " + ", ".join(f"{k} {n}" for k, n in syncs.items()), ""]
if (out / "full" / "metrics.json").exists():
    gpu = json.loads((out / "full" / "metrics.json").read_text())
    cpu = json.loads(Path("outputs/metrics.json").read_text())
    lines += [f"Default run: {gpu['total_seconds']} s inside the script on CUDA; the committed CPU "
              f"run: {cpu['total_seconds']} s on {cpu['threads']} threads.", "",
              "| model | device | epochs (restored) | train s | test ACC | test AUC | val AUC |",
              "|---|---|---|---|---|---|---|"]
    for name, m in gpu["models"].items():
        for device, run in (("cuda", m), ("cpu", cpu["models"].get(name, {}))):
            if run.get("status") == "trained" and "history" in run:
                lines.append(
                    f"| {name} | {device} | {run['epochs_trained']}/{run['max_epochs']} "
                    f"({run['best_epoch']}) | {run['train_seconds']:.0f} "
                    f"| {run['test']['accuracy']:.3f} | {run['test']['auc']:.3f} | "
                    f"{run['val']['auc']:.4f} |")
    lines += ["", f"Chosen on validation: cuda {gpu['best_model']}, cpu {cpu['best_model']}. "
              "Same seed, other hardware: the data order and the initial weights match the CPU "
              "run, but augmentation and dropout draw from the GPU's own random generator and "
              "cuDNN sums in another order, so the numbers differ as another seed's would "
              "(bench/results/recipe.md has the spread over seeds)."]
Path("bench/results/gpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
print("\n".join(lines))
PY
[ -n "$copy_to" ] && mkdir -p "$copy_to" && cp bench/results/gpu.md "$out"/*.log "$out"/*.json \
  "$copy_to"/ 2>/dev/null
echo "gpu_check: wrote bench/results/gpu.md${copy_to:+ (copied to $copy_to)}"
failed=$(cat "$out"/*.rc | grep -cv '^0$')
exit $(( failed > 0 ))
