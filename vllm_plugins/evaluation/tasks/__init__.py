"""lm-eval task YAMLs (``--include_path`` this folder) and their data builders."""
