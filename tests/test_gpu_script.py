"""benchmarks/gpu.sh, the one GPU run this project prepares, keeps working: its --device cpu --quick mode runs every
step at toy sizes (layer and model-step benchmarks, a short training run, a chapter executed without Jupyter)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_every_step_on_the_cpu(tmp_path, shakespeare_root):
    env = {**os.environ, "OUT": str(tmp_path), "SWITCH_CORE_DATA": str(shakespeare_root), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    *steps, spent = summary.splitlines()
    assert [line.split()[0] for line in steps] == ["layer", "train_step", "preset_gpu", "chapters"]
    assert all("rc=0" in line for line in steps)
    assert spent.startswith("budget 480s, used ")
    layer = json.loads((tmp_path / "layer.json").read_text())
    assert {r["layer"] for r in layer["rows"]} >= {"dense FeedForward", "switch auto", "switch loop"}
    steps = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert {r["model"] for r in steps} >= {"dense SwitchLM", "Switch SwitchLM"}
    assert (tmp_path / "preset_gpu" / "metrics.csv").exists() and not list((tmp_path / "preset_gpu").glob("*.pt"))
    chapters = json.loads((tmp_path / "chapters" / "summary.json").read_text())
    assert chapters == [dict(chapters[0], chapter="routing", status="passed")] and chapters[0]["cells_run"] > 5
    assert list((tmp_path / "chapters" / "routing").glob("fig-*.png"))
    assert "torch" in (tmp_path / "env.txt").read_text()


@pytest.mark.parametrize("args, first", [(["--device", "tpu"], "error: --device"),
                                         (["--budget", "8m"], "error: --budget"),
                                         (["--budget", "0"], "error: --budget"),
                                         (["--fast"], "error: unknown argument --fast")])
def test_gpu_script_refuses_a_bad_argument(tmp_path, args, first):
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(first), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "summary.txt").exists()


def test_gpu_script_does_not_write_over_an_earlier_run(tmp_path):
    (tmp_path / "summary.txt").write_text("an earlier run\n")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    args = ["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick", "--budget", "5"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: OUT=") and "--overwrite" in proc.stderr
    assert os.listdir(tmp_path) == ["summary.txt"] and (tmp_path / "summary.txt").read_text() == "an earlier run\n"
    proc = subprocess.run(args + ["--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and (tmp_path / "summary.txt").read_text().startswith("layer ")  # all skipped


def test_gpu_script_skips_what_its_budget_leaves_no_time_for(tmp_path):
    # The whole run must fit the device's time: a step that would start with under 10 s of the budget left is
    # skipped, recorded, and fails the run; nothing is started past the budget.
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick", "--budget", "5",
                           "--sweeps", "experts"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    *steps, spent = (tmp_path / "summary.txt").read_text().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert [line.split()[:2] for line in steps] == [[n, "rc=skip"] for n in
                                                   ("layer", "train_step", "preset_gpu", "chapters", "sweep-experts")]
    assert (tmp_path / "layer.txt").read_text().startswith("skipped: ") and not (tmp_path / "layer.json").exists()
    assert spent.startswith("budget 5s, used ")


def test_chapter_runner_fails_a_chapter_whose_assert_fails(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("---\njupytext:\n  text_representation:\n    format_name: myst\n---\n# Bad\n\n"
                   "```{code-cell} ipython3\nx = 1\n```\n\n```{code-cell} ipython3\n:tags: [skip-execution]\n"
                   "raise SystemExit\n```\n\n```{code-cell} ipython3\nassert x == 2, 'x is not 2'\n```\n")
    proc = subprocess.run([sys.executable, "benchmarks/run_chapters.py", "--out", str(tmp_path / "o"), str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert json.loads((tmp_path / "o" / "summary.json").read_text())[0]["status"] == "failed in cell 2"
    assert "x is not 2" in (tmp_path / "o" / "bad" / "log.txt").read_text()


def test_chapter_runner_runs_writefile_cells(tmp_path):
    """scaling_out.md writes its scripts with IPython's %%writefile magic; the runner does the same, {expr}
    expanded in the chapter's namespace, so the GPU run can execute every chapter."""
    md = tmp_path / "magic.md"
    md.write_text("---\njupytext:\n  text_representation:\n    format_name: myst\n---\n# Magic\n\n"
                  f"```{{code-cell}} ipython3\nwork = {str(tmp_path)!r}\n```\n\n"
                  "```{code-cell} ipython3\n%%writefile {work}/script.py\nprint('hi')\n```\n\n"
                  "```{code-cell} ipython3\n%%writefile -a {work}/script.py\nprint('again')\n```\n\n"
                  "```{code-cell} ipython3\nimport subprocess, sys\nout = subprocess.run([sys.executable, "
                  "f'{work}/script.py'], capture_output=True, text=True).stdout\n"
                  "assert out == 'hi\\nagain\\n', out\n```\n")
    proc = subprocess.run([sys.executable, "benchmarks/run_chapters.py", "--out", str(tmp_path / "o"), str(md)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "o" / "magic" / "log.txt").read_text()
    assert proc.returncode == 0, log
    assert f"Writing {tmp_path}/script.py" in log and f"Appending to {tmp_path}/script.py" in log


@pytest.mark.parametrize("script", ["bench_layer.py", "bench_train.py"])
def test_benchmarks_refuse_a_json_path_they_could_not_write_before_running(tmp_path, script):
    # Checked before any timing: the results of a long run are not lost to a typo in --json at its end.
    missing = tmp_path / "no-such-folder" / "out.json"
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--json", str(missing)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        f"error: --json: no folder {missing.parent} to write out.json into"), proc.stderr
    assert not proc.stdout and not missing.parent.exists()


def test_chapter_runner_stopped_by_its_time_limit_keeps_what_it_did(tmp_path):
    # gpu.sh's `timeout` sends SIGTERM: the chapter running is recorded as stopped in its cell (its log so far
    # kept), the chapters before it keep their results, and the ones after it are not started.
    head = "---\njupytext:\n  text_representation:\n    format_name: myst\n---\n# {}\n\n"
    quick, slow, later = (tmp_path / f"{n}.md" for n in ("quick", "slow", "later"))
    quick.write_text(head.format("Quick") + "```{code-cell} ipython3\nassert 1 + 1 == 2\n```\n")
    slow.write_text(head.format("Slow") + "```{code-cell} ipython3\nx = 1\n```\n\n```{code-cell} ipython3\n"
                    "import time\nprint('cell 1 started', flush=True)\ntime.sleep(120)\n```\n")
    later.write_text(head.format("Later") + "```{code-cell} ipython3\nx = 1\n```\n")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "benchmarks/run_chapters.py", "--out", str(out), str(quick), str(slow),
                             str(later)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "slow" / "log.txt"
    deadline = time.monotonic() + 60
    while not (log.exists() and "cell 1 started" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "the slow cell never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "stopped (SIGTERM)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["chapter"], r["status"]) for r in summary] == [("quick", "passed"), ("slow", "stopped in cell 1")]
    assert "--- stopped in cell 1 (SIGTERM" in log.read_text() and not (out / "later").exists()
