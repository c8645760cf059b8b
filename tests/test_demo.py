"""The README's main command, `python -m lora_kernels.demo`, in its quick mode: every check passes,
and nothing touches the network."""
import socket

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_demo_quick_passes_every_check_offline(monkeypatch, tmp_path, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError(f"the demo tried the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from lora_kernels import demo

    rep = demo.run(quick=True, device="cpu", out_dir=str(tmp_path))
    out = capsys.readouterr().out
    assert "checks passed" in out
    assert not rep.failed, rep.failed
    checks = [what for what, _, _ in rep.checks]
    for expected in ("fused logits == PEFT logits", "adapter 'default': loss clearly falls",
                     "reloaded with PEFT (and fused) == trained model",
                     "loaded without PEFT (lora_kernels.load_adapter) == trained model",
                     "merged == unmerged", "adapter 'task2': loss clearly falls", "every row == its adapter alone",
                     "MultiLoRALinear: every row == its adapter alone"):
        assert expected in checks, f"step missing: {expected}"
    assert {"train_peft", "train_fused", "infer_peft", "infer_fused", "infer_merged"} <= set(rep.timings)
    assert (tmp_path / "adapter1" / "adapter_config.json").exists()
    assert (tmp_path / "adapter1" / "adapter_model.safetensors").exists()
    assert demo.os.environ["HF_HUB_OFFLINE"] == "1"
