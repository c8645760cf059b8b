"""The CUDA C++ backend's Python side, mirroring ``lora_kernels/triton/``: ``loader`` finds and
loads the extension ``lora_kernels._C`` (AOT build, or a JIT build that announces itself), and one
launcher module per op family -- ``lora_linear``, ``multi_lora``, ``merge`` -- checks what its
kernels take and launches them. Imported on first use only; importing it loads nothing.
"""
