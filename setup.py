"""Build script.

Pure-Python install for now; the CUDA C++ extension ``lora_kernels._C`` is added here when
``csrc/`` holds its sources (see DESIGN.md section 5).
"""
from setuptools import setup

setup()
