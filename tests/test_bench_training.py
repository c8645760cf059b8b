"""`python -m bench --suite training` runs, checks every method (dropout ones against the mask they
drew) and writes its results."""
import json

from bench.run import main


def test_bench_training_quick_runs_and_checks(tmp_path):
    assert main(["--quick", "--suite", "training", "--layers", "tiny", "--tokens", "37",
                 "--out", str(tmp_path), "--rep-ms", "2", "--device", "cpu"]) == 0
    (path,) = tmp_path.glob("*training*.json")
    result = json.loads(path.read_text())
    assert len(result["cases"]) == 1 and all(not c["failed"] for c in result["cases"])
    names = set(result["cases"][0]["times_us"])
    assert {"base", "base_autograd"} <= names
    ours = {n for n in names if n.startswith("ours_")}
    assert {s for n in ours for s in ("", "_fp32", "_dropout") if n.endswith(s)} == {"", "_fp32", "_dropout"}
    assert all(c["errors"][n] < 1e-5 for c in result["cases"] for n in ours)
    assert result["summary"] and (tmp_path / path.name.replace(".json", ".md")).exists()


def test_bench_overhead_quick_runs_and_checks(tmp_path):
    assert main(["--quick", "--suite", "overhead", "--out", str(tmp_path), "--device", "cpu"]) == 0
    (path,) = tmp_path.glob("*overhead*.json")
    result = json.loads(path.read_text())
    (case,) = result["cases"]
    assert not case["failed"]
    assert {"base", "reference_work", "base_train"} <= set(case["times_us"])
    assert any(k.startswith("ours_") and k.endswith("_train") for k in case["times_us"])
    assert any(k.endswith("_minus_reference_work_us") for k in result["summary"])
    assert "ours_auto" in case["times_us"]  # the layers' default backend, timed like the others
    # issue 16's host target is evaluated on the CPU run (its value is a time: never asserted)
    rows = {r["method"]: r for r in result["targets"]}
    assert rows["ours_torch_minus_reference_work_us"]["bound"] == 15.0
    assert all(rows[k]["measured"] is not None for k in (
        "ours_torch_minus_reference_work_us", "ours_auto_minus_reference_work_us",
        "ours_multi_torch_minus_multi_reference_work_us", "ours_se_torch_minus_se_reference_work_us"))
