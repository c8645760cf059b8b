"""Importing the package is cheap: no Triton import, no compile, no CUDA initialisation."""
import subprocess
import sys


def test_import_is_light():
    code = ("import sys, torch, lora_kernels; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
            "assert not any(m.startswith('lora_kernels.triton') for m in sys.modules); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
