"""Serving-framework integrations: vLLM (``integrations.vllm``) and SGLang (``integrations.sglang``).

Nothing here imports a framework at package import: each module imports its framework only when
the framework itself resolves the class (vLLM's punica-wrapper qualname, SGLang's backend
registry) or when its ``register()`` entry point runs. The framework-free parts (the persistent
token index, the slice bookkeeping) live in ``_common``.
"""
