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


def test_tune_measures_checks_and_keeps_the_fastest(interpreter_device):
    """The tuning suite's per-bucket logic with its real check-and-time function, on a tiny
    shape under the interpreter: every candidate is checked against float64, the best is kept."""
    import torch
    import bench.tune as tune
    from lora_kernels.triton.lora_linear import forward_config
    heuristic = forward_config(20, 96, 64, 4, 4, 4)
    bucket = {"fields": {"layer": "tiny", "K": 64, "N": 96, "M": 20, "r": 4}, "key": tune.bucket_key(20, 96, 64, 4, 4),
              "heuristic": heuristic, "dtype": torch.float32}
    cases = tune.tune_buckets([bucket], tune._measure_on(torch.device("cpu"), rep_ms=1),
                              lambda b: tune.candidates(20, 4, 4, heuristic)[:2], budget_s=1e9)
    (case,) = cases
    assert not case["failed"], case["failed"]
    assert set(case["times_us"]) == {"heuristic", "c1", "c2"}
    assert case["best"] in case["times_us"] and 0 < case["ratios"]["best"] <= 1.0


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
