#!/usr/bin/env bash
# gpu_check.sh — what a GPU machine must show, in one command from the project root (within 8 minutes on one H100):
#   1. the tests marked `cuda` (tests/test_cuda.py: explain on CUDA, AMP bf16/fp16, channels_last, the device cache,
#      fused optimizers, no host sync per step, every scan backend against the definition, DDP on two GPUs), and
#      scripts/scan_kernels.py --device cuda: every Triton scan kernel variant loaded on this GPU (its registers and
#      spills as the driver reports them) and run against the step-by-step definition;
#   2. scripts/bench_train.py at S0's sizes (224 px, bf16, the uint8 cache on the GPU): densenet121 supervised at
#      batch 128, mambavision_t2 BYOL at batch 256, vmamba_s supervised at batch 128 (img/s, peak GPU memory);
#   3. `python -m tune_xray.search byol --smoke --gpus-per-trial 0.5` through its ensemble and report;
# then one table of pass/fail and the numbers against issue #17's goals. Exit 0 when every step ran.
#
#   bash scripts/gpu_check.sh [OUT_DIR]       # logs, JSON and the runs under OUT_DIR (default: $OUT or a temp dir)
#
# The lent GPU host has torch but not Ray, Optuna, MLflow or kornia: carry `.devicepack` (built here by
# ../shared/tools/device-pack.sh) and this script unpacks it and installs the project's metadata against it.
set -uo pipefail
out=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! $py -c "import ray, optuna, mlflow, kornia, timm" 2>/dev/null; then
  if [ ! -f .devicepack/site.tar.xz ]; then
    echo "gpu_check: the stack does not import and there is no .devicepack/site.tar.xz to unpack" >&2
    exit 2
  fi
  mkdir -p /tmp/site && tar xJf .devicepack/site.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  $py -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null  # metadata MLflow reads
fi
if ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA device here" >&2
  exit 2
fi

steps="$out/steps.jsonl"
: > "$steps"
run() {  # run NAME COMMAND...: its output in OUT/NAME.log, its exit code and seconds in steps.jsonl
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$steps"
  tail -n 3 "$out/$name.log"
}

bench=(scripts/bench_train.py --device cuda --cache device --images 2000 --steps 20 --cache-dir "$out/cache")
run cuda_tests $py -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider
run scan_kernels $py scripts/scan_kernels.py --device cuda
run densenet121 $py "${bench[@]}" --backbones densenet121 --phases supervised --batch 128 --json "$out/densenet121.json"
run mambavision_t2 $py "${bench[@]}" --backbones mambavision_t2 --phases byol --byol-batch 256 --json "$out/mambavision_t2.json"
run vmamba_s $py "${bench[@]}" --backbones vmamba_s --phases supervised --batch 128 --json "$out/vmamba_s.json"
run smoke_search $py -m tune_xray.search byol --smoke --gpus-per-trial 0.5 --cpus-per-trial 4 --storage "$out/runs" \
  --name gpu-check

$py - "$out" <<'PY'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
rows = []


def log(name):
    return (out / f"{name}.log").read_text(errors="replace")


def failed(name):
    text = log(name)
    why = "out of memory" if "OutOfMemoryError" in text else next(
        (line.strip() for line in reversed(text.splitlines()) if "Error" in line), f"exit {steps[name]['rc']}")
    return f"FAILED ({why[:80]})"


tests = steps["cuda_tests"]
counts = ", ".join(re.findall(r"\d+ (?:passed|failed|skipped|error)", log("cuda_tests"))) or "no summary"
rows.append(("cuda tests", "pass" if tests["rc"] == 0 else "FAILED", counts, "all pass"))
kernels = re.search(r"spills: (\d+); worst fp32 relative error (\S+)", log("scan_kernels"))
rows.append(("Triton scan kernels", "pass" if steps["scan_kernels"]["rc"] == 0 else failed("scan_kernels"),
             f"spills {kernels[1]}, worst fp32 error {kernels[2]}" if kernels else "",
             "no spills, error <= 1e-4"))
goals = {"densenet121": ("supervised b128", 2400, None), "mambavision_t2": ("BYOL b256", 1200, None),
         "vmamba_s": ("supervised b128", 600, 40.0)}
for name, (what, rate, peak_goal) in goals.items():
    if steps[name]["rc"] != 0:
        rows.append((f"{name} {what}", failed(name), "", ""))
        continue
    row = json.loads((out / f"{name}.json").read_text())[0]
    r = row["device cache"]
    unit = "img/s" if row["phase"] == "supervised" else "pairs/s"
    ok = r["img/s"] >= rate and (peak_goal is None or r["peak_gib"] <= peak_goal)
    scan = f", scan {row['scan_backend']}" if row["scan_backend"] != "none" else ""
    rows.append((f"{name} {what}", "pass" if ok else "below goal",
                 f"{r['img/s']:,.0f} {unit}, peak {r['peak_gib']:.1f} GiB{scan}",
                 f">= {rate:,} {unit}" + (f", peak <= {peak_goal:g} GiB" if peak_goal else "")))
search = steps["smoke_search"]
summary_file = out / "runs" / "gpu-check" / "summary.json"
if search["rc"] == 0 and summary_file.is_file():
    s = json.loads(summary_file.read_text())
    registered = bool((s.get("ensemble") or {}).get("registered"))
    report = str(s.get("report", "")).endswith(".html")
    ok = s["status"] == "complete" and registered and report
    rows.append(("smoke search, 0.5 GPU/trial", "pass" if ok else "FAILED",
                 f"{s['complete']} complete, {s['pruned']} pruned, {s['error']} error; ensemble "
                 f"{'registered' if registered else 'missing'}; report {'written' if report else s.get('report')}; "
                 f"{search['seconds']} s", "ensemble + report"))
else:
    rows.append(("smoke search, 0.5 GPU/trial", failed("smoke_search"), "", "ensemble + report"))

widths = [max(len(str(r[i])) for r in rows + [("check", "result", "measured", "goal")]) for i in range(4)]
for r in [("check", "result", "measured", "goal"), tuple("-" * w for w in widths), *rows]:
    print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
print(f"total {sum(s['seconds'] for s in steps.values())} s; logs in {out}")
sys.exit(1 if any(s["rc"] for s in steps.values()) else 0)
PY
