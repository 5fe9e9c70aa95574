"""`bench_train.py --phases` (benchmarks/step_phases.py): the step's phases and the FFNs inside it, dense vs Switch,
are timed and add up (a smoke test at toy sizes: no timing is asserted beyond consistency)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_phases_time_every_phase_of_both_models_and_the_ffns_inside_them(tmp_path):
    out = tmp_path / "phases.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--phases", "--configs", "tiny", "--rounds", "2",
                           "--steps-per-round", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["phase"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["forward", "backward", "clip + AdamW", "FFN forward", "FFN backward"]
    for model in ("dense_ms", "switch_ms"):
        assert all(r[model] > 0 for r in rows.values())
        # an FFN's share lies inside its phase: the hooks fire in the step, not around it
        assert rows["FFN forward"][model] < rows["forward"][model]
        assert rows["FFN backward"][model] < rows["backward"][model]
    assert "Switch ÷ dense tokens/s" in proc.stdout


def test_phases_refuse_the_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--phases", "--device", "cuda"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: --phases times host wall clock: CPU only" in proc.stderr
