"""Accuracy of served checkpoints with lm-eval.

- ``tasks/``: local lm-eval task YAMLs; their data is built at run time from
  ``../shared/data`` by ``tasks/data.py`` (no hub, nothing copied);
- :mod:`.runner`: runs lm-eval per model, against ``vllm serve``
  (``local-completions``) or in-process vLLM (``vllm``), and builds the table;
- :mod:`.cli`: the ``vllm-plugins eval`` subcommand.
"""
