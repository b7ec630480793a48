"""vLLM plugin entry point.

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers) through the ``vllm.general_plugins`` entry point group.
"""


def register() -> None:
    """Register this package's models and quantization methods with vLLM.

    Safe to call more than once, lazy (models are registered as
    ``"module:Class"`` strings), and never touches a device.
    """
    from vllm_plugins.registration import register_all

    register_all()
