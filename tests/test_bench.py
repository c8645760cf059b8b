"""The README's main command: `python -m bench --quick` runs, checks and writes its results."""
import json

from bench.run import main


def test_bench_quick_runs_and_checks(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--rep-ms", "5", "--device", "cpu"]) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["cases"] and all(not c["failed"] for c in result["cases"])
    names = set(result["cases"][0]["times_us"])
    ours = {n for n in names if n.startswith("ours_")}  # ours_triton here under the interpreter
    assert {"base", "naive", "skilled"} <= names and ours
    assert all(c["errors"][n] < 1e-5 for c in result["cases"] for n in ours)
    assert (tmp_path / path.name.replace(".json", ".md")).exists()


def test_tune_case_checks_and_times_candidates(interpreter_device, monkeypatch):
    """The GPU tuning suite's per-case logic, on a tiny shape under the interpreter."""
    import torch
    import bench.tune as tune
    real = tune.candidates
    monkeypatch.setattr(tune, "candidates", lambda *a: real(*a)[:2])
    case = tune.run_case("tiny", 64, 96, 20, 4, torch.float32, torch.device("cpu"), rep_ms=1)
    assert not case["failed"], case["failed"]
    assert set(case["times_us"]) == {"heuristic", "c1", "c2"}
    assert case["best"] in case["times_us"] and 0 < case["ratios"]["best"] <= 1.0
    assert all(err < 1e-5 for err in case["errors"].values())


def test_bench_merge_suite_quick_runs_and_checks(tmp_path):
    assert main(["--suite", "merge", "--quick", "--out", str(tmp_path), "--rep-ms", "5", "--device", "cpu"]) == 0
    (path,) = tmp_path.glob("*merge*.json")
    result = json.loads(path.read_text())
    case = result["cases"][0]
    assert not case["failed"]
    assert {"floor", "peft", "addmm"} <= set(case["times_us"])
    ours = {n for n in case["times_us"] if n.startswith("ours_")}
    assert any(n.endswith("_exact_cycle") for n in ours) and any(n.endswith("_safe") for n in ours)
    assert case["errors"]["floor"] == 0.0 and all(case["errors"][n] < 1e-5 for n in ours)
