"""vLLM-side quantization methods for ``quant_method: "vllm_plugins"`` checkpoints.

- :mod:`.schema`: the validated ``quantization_config`` (no vLLM import);
- :mod:`.packing`: tensor layouts and the torch reference / fallback;
- :mod:`.config`: the vLLM ``QuantizationConfig``;
- :mod:`.w4a16`, :mod:`.w8a8`: the linear methods;
- :mod:`.cpu_int4`: a CPU int4 kernel for vLLM's mixed-precision kernel choice;
- :mod:`.plugin`: imported by :func:`vllm_plugins.register` to register them.
"""
