"""The tuned-config table (lora_kernels/configs): write, read, nearest bucket, and the config
functions reading it, with the heuristics as the fallback; the tuner's budget and table logic
with a synthetic clock and timings (CPU: no GPU needed)."""
import json

import pytest

from lora_kernels import configs

NUM_SMS = 132
KEY = {"M": 1024, "N": 4096, "K": 4096, "r": 16, "elem_bytes": 2, "mask_epilogue": False, "split_adapters": False}
TUNED = {"block_m": 64, "block_n": 256, "block_k": 64, "block_r": 16, "tiles_per_program": 1, "group_m": 4,
         "num_warps": 8, "num_stages": 4, "split_k": 1, "precompute_t": True}


@pytest.fixture
def table():
    t = configs.new_table("NVIDIA H200", NUM_SMS, "3.6.0")
    configs.record(t, "forward", KEY, TUNED, 31.0)
    yield t
    configs.reset()


def test_card_file_name():
    assert configs.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert configs.table_path("NVIDIA H200", "/x").endswith("/x/nvidia-h200.json")


def test_save_load_round_trip_and_record_replaces(tmp_path, table):
    configs.record(table, "forward", KEY, {**TUNED, "num_stages": 3}, 30.0)
    assert len(table["entries"]["forward"]) == 1
    path = str(tmp_path / "card.json")
    configs.save_table(table, path)
    assert configs.load_table(path) == json.loads(json.dumps(table))
    assert configs.load_table(str(tmp_path / "absent.json")) is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a lora_kernels config table"):
        configs.load_table(str(tmp_path / "bad.json"))


def test_nearest_bucket(table):
    other = {**KEY, "M": 16}
    configs.record(table, "forward", other, {**TUNED, "block_m": 16}, 9.0)
    assert configs.nearest(table, "forward", {**KEY, "M": 2048})["block_m"] == 64    # 1 octave from 1024
    assert configs.nearest(table, "forward", {**KEY, "M": 8})["block_m"] == 16       # 1 octave from 16
    assert configs.nearest(table, "forward", {**KEY, "M": 100})["block_m"] == 16     # log-nearer 16 than 1024
    assert configs.nearest(table, "forward", {**KEY, "M": 65536}) is None            # 6 octaves: too far
    assert configs.nearest(table, "forward", {**KEY, "elem_bytes": 4}) is None       # another dtype
    assert configs.nearest(table, "forward", {**KEY, "mask_epilogue": True}) is None
    assert configs.nearest(table, "shrink", KEY) is None
    assert configs.nearest(None, "forward", KEY) is None


def test_forward_config_reads_the_table_and_falls_back(table):
    from lora_kernels.triton.lora_linear import forward_config
    configs.set_table(None)
    heuristic = forward_config(1024, 4096, 4096, 16, 2, NUM_SMS)
    configs.set_table(table)
    tuned = forward_config(1024, 4096, 4096, 16, 2, NUM_SMS)
    assert (tuned.block_n, tuned.num_stages, tuned.group_m) == (256, 4, 4) and tuned != heuristic
    # a nearby rank takes the measured tiles with its own rank tile
    assert forward_config(1024, 4096, 4096, 32, 2, NUM_SMS).block_r == 32
    assert forward_config(1024, 4096, 4096, 32, 2, NUM_SMS).block_n == 256
    # far away, another dtype, or a card with another SM count: the heuristic
    assert forward_config(1, 4096, 4096, 16, 2, NUM_SMS).block_m == 16
    assert forward_config(1024, 4096, 4096, 16, 4, NUM_SMS) == forward_config.__wrapped__(
        1024, 4096, 4096, 16, 4, NUM_SMS) and forward_config(1024, 4096, 4096, 16, 4, NUM_SMS).block_n != 256
    assert forward_config(1024, 4096, 4096, 16, 2, 114) != tuned
    configs.set_table(None)
    assert forward_config(1024, 4096, 4096, 16, 2, NUM_SMS) == heuristic


def test_no_table_on_a_machine_without_cuda():
    configs.reset()
    assert configs.lookup("forward", NUM_SMS, **KEY) is None


def test_tuner_keeps_the_fastest_within_its_budget(tmp_path):
    import bench.tune as tune
    from lora_kernels.triton.lora_linear import ForwardConfig
    base = ForwardConfig(64, 128, 64, 16, 1, 8, 4, 4, 2, True)
    fast = ForwardConfig(128, 128, 64, 16, 1, 8, 8, 3, 1, True)
    now = [0.0]

    def clock():
        return now[0]

    def measure(bucket, cfg):
        now[0] += 10.0  # each measurement costs 10 s of "GPU time"
        if cfg.block_m == 32:
            return None  # fails its check
        return 5.0 if cfg == fast else 8.0

    buckets = [{"fields": {"layer": "l", "K": 4096, "N": 4096, "M": m, "r": 16},
                "key": tune.bucket_key(m, 4096, 4096, 16, 2), "heuristic": base} for m in (128, 1024, 4096)]
    cands = lambda b: [fast, ForwardConfig(32, 128, 64, 16, 1, 8, 4, 4)]  # noqa: E731
    cases = tune.tune_buckets(buckets, measure, cands, budget_s=45.0, clock=clock)
    # 3 measurements per bucket at 10 s each: the second bucket is cut off after its heuristic + 1
    assert [c["M"] for c in cases] == [128, 1024]
    assert cases[0]["best"] == "c1" and cases[0]["ratios"]["best"] == pytest.approx(5.0 / 8.0)
    assert any("failed its check" in f for f in cases[0]["failed"])
    assert any("budget" in f for f in cases[1]["failed"])
    path = str(tmp_path / "card.json")
    written = tune.write_table(cases, configs.new_table("card", NUM_SMS, "x"), path)
    assert configs.load_table(path) == json.loads(json.dumps(written))
    assert configs.nearest(written, "forward", tune.bucket_key(128, 4096, 4096, 16, 2))["block_m"] == 128
