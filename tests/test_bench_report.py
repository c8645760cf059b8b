"""The benchmark report's pieces on synthetic results (CPU): the PNG per suite (time / baseline
against M, a line per method, a panel per layer) and the issue-16 targets table."""
import pytest


def _result(suite="forward"):
    cases = []
    for layer in ("8B q/o", "8B k/v"):
        for M in (1, 16, 1024, 4096):
            for r in (16, 64):
                ours = 1.02 if M >= 1024 else 1.3
                cases.append({"layer": layer, "K": 4096, "N": 4096, "M": M, "r": r, "baseline": "base",
                              "times_us": {"base": 10.0, "skilled": 15.0, "ours_triton": 10.0 * ours},
                              "ratios": {"base": 1.0, "skilled": 1.5, "ours_triton": ours}, "failed": []})
    return {"suite": suite, "meta": {"device": "NVIDIA H200", "date": "2026-12-03", "commit": "abc"},
            "cases": cases, "summary": {}}


def test_plot_series_groups_panels_lines_and_points():
    from bench.summarize import plot_series
    series = plot_series(_result())
    assert set(series) == {"8B q/o", "8B k/v"}
    lines = series["8B q/o"]
    assert set(lines) == {"skilled r=16", "skilled r=64", "ours_triton r=16", "ours_triton r=64"}  # not the baseline
    assert lines["ours_triton r=16"] == [(1, 1.3), (16, 1.3), (1024, 1.02), (4096, 1.02)]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.summarize import plot
    path = tmp_path / "run.png"
    assert plot(_result(), str(path)) == f"wrote {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_axes_says_why(tmp_path):
    from bench.summarize import plot
    result = {"suite": "overheadish", "cases": [{"times_us": {"a": 1.0}, "ratios": {}}]}
    assert "no layer/M axes" in plot(result, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_targets_pass_fail_and_not_measured():
    from bench import targets
    rows = {(r["target"], r["method"]): r for r in targets.evaluate(_result(), ["triton", "cuda"])}
    big16 = rows[("fused forward, geomean ours/cuBLAS at M >= 1024, r = 16", "ours_triton")]
    assert big16["measured"] == pytest.approx(1.02) and big16["pass"] and big16["cases"] == 4
    decode = rows[("fused forward, geomean ours/cuBLAS at M <= 16 (CUDA graphs)", "ours_triton")]
    assert decode["measured"] == pytest.approx(1.3) and decode["pass"] is False
    worst = rows[("fused forward, worst shape ours/cuBLAS", "ours_triton")]
    assert worst["measured"] == pytest.approx(1.3) and not worst["pass"]
    cuda = rows[("fused forward, worst shape ours/cuBLAS", "ours_cuda")]
    assert cuda["measured"] is None and cuda["pass"] is None  # never ran: not invented
    table = targets.markdown(list(rows.values()))
    assert "| FAIL |" in table and "| pass |" in table and "not measured" in table


def test_exact_merge_target_is_relative_to_the_plain_merge():
    from bench import targets
    case = {"layer": "x", "M": 0, "baseline": "floor", "times_us": {"floor": 10.0, "ours_triton": 12.0,
                                                                    "ours_triton_exact_cycle": 20.0},
            "ratios": {"floor": 1.0, "ours_triton": 1.2, "ours_triton_exact_cycle": 2.0}, "failed": []}
    rows = targets.evaluate({"suite": "merge", "cases": [case]}, ["triton"])
    plain, exact = rows
    assert plain["measured"] == pytest.approx(1.2) and plain["pass"]
    assert exact["measured"] == pytest.approx(20.0 / 12.0) and not exact["pass"]


def test_host_targets_from_the_overhead_summary():
    """The overhead suite's µs target (CPU runs) is read from its summary, per backend and auto;
    a number the run lacks is "not measured", never invented."""
    from bench import targets
    result = {"suite": "overhead-quick", "cases": [{}],
              "summary": {"ours_torch_minus_reference_work_us": 4.5, "ours_auto_minus_reference_work_us": 16.0}}
    rows = {r["method"]: r for r in targets.evaluate_host(result, ["torch", "triton"])}
    assert "ours_multi_torch_minus_multi_reference_work_us" in rows and "ours_multi_auto" not in str(rows)
    assert rows["ours_torch_minus_reference_work_us"]["pass"] is True
    assert rows["ours_auto_minus_reference_work_us"]["pass"] is False
    assert rows["ours_triton_minus_reference_work_us"]["measured"] is None
    assert rows["ours_triton_minus_reference_work_us"]["pass"] is None
    table = targets.markdown(list(rows.values()))
    assert "<= 15.0 µs" in table and "| 4.5 µs |" in table and "| FAIL |" in table and "not measured" in table
    assert targets.evaluate_host({"suite": "forward", "cases": [], "summary": {}}, ["torch"]) == []
