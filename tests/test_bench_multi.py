"""`python -m bench --suite multi --quick` runs, checks every method and writes its results."""
import json

from bench.multi import floor_us
from bench.run import main


def test_bench_multi_quick_runs_and_checks(tmp_path):
    assert main(["--suite", "multi", "--quick", "--out", str(tmp_path), "--rep-ms", "2", "--device", "cpu"]) == 0
    (path,) = tmp_path.glob("*-multi-quick.json")
    result = json.loads(path.read_text())
    assert result["cases"] and all(not c["failed"] for c in result["cases"])
    names = set(result["cases"][0]["times_us"])
    assert {"floor", "base", "peft_loop", "peft_loop_layer"} <= names
    ours = {n for n in names if n.startswith("ours_")}
    assert {"ours_se_triton", "ours_linear_triton", "ours_shrink_triton", "ours_expand_triton"} <= ours
    plain = [c for c in result["cases"] if "kind" not in c]
    assert all(c["errors"][n] < 1e-5 for c in plain for n in ours)
    assert all(c["index_us"] > 0 and c["ratios"]["floor"] == 1.0 for c in plain)
    assert (tmp_path / path.name.replace(".json", ".md")).exists()
    slices = [c for c in result["cases"] if c.get("kind") == "slices"]
    steps = [c for c in result["cases"] if c.get("kind") == "decode_step"]
    assert slices and steps
    assert all({"ours_slices_triton", "ours_per_slice_triton", "floor"} <= set(c["times_us"]) for c in slices)
    assert all({"ours_step_triton", "ours_o_proj_triton"} <= set(c["times_us"]) for c in steps)
    assert "triton" in result["slice_summary"]


def test_floor_counts_x_y_and_active_adapters():
    # M=2, K=3, N=5, two active adapters of ranks 1 and 4, 2-byte elements, 1e6 B/s -> µs = bytes
    assert floor_us(2, 3, 5, [1, 4], 2, 1e6) == 2 * (2 * 3 + 2 * 2 * 5 + (1 + 4) * (3 + 5))


def test_brief_lists_every_case(tmp_path):
    from bench.multi import brief
    assert main(["--suite", "multi", "--quick", "--out", str(tmp_path), "--rep-ms", "1", "--device", "cpu"]) == 0
    (path,) = tmp_path.glob("*-multi-quick.json")
    result = json.loads(path.read_text())
    lines = brief(result)
    plain = [c for c in result["cases"] if "kind" not in c]
    slices = [c for c in result["cases"] if c.get("kind") == "slices"]
    assert len(lines) == 2 + len(plain) + len(slices) and "FAILED" not in "".join(lines)
