"""The toolkit runs where vLLM is not installed (a GPU box used only for quantization).

Dynamic check: a tiny LLaMA-variant checkpoint (its transformers registration
is the package's own) is quantized in subprocesses in which importing ``vllm``
raises ``ModuleNotFoundError`` (a meta-path finder installed before anything
else is imported), once through ``python -m quant`` (``vllm_plugins`` blocked
too) and once through ``vllm-plugins quantize``; both exports must equal the
one of a normal in-process run tensor for tensor.

Static check: no module under ``quant/`` imports ``vllm`` or ``vllm_plugins``,
directly or through the first-party modules it imports (the AST, followed
transitively, including imports inside functions and the ``"module:Class"``
targets of :data:`models.hf_registration.HF_CONFIGS`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from quant.cli import main as quant_main

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("quant", "models", "eagle", "vllm_plugins")
FORBIDDEN = ("vllm", "vllm_plugins")

QUANT_ARGS = ["--scheme", "w4a16", "--group-size", "32", "--num-samples", "8", "--seqlen", "32", "--device", "cpu",
              "--no-progress"]


@pytest.fixture(scope="module")
def source(tiny_llama, tmp_path_factory):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, model_type="llama_variant", qk_norm=True)
    from models.tiny import synthetic_corpus

    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("\n\n".join(synthetic_corpus(40)))
    return model, calib


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    model, calib = source
    out = tmp_path_factory.mktemp("ref") / "out"
    assert quant_main(["--model", str(model), "--out", str(out), "--calib", str(calib), *QUANT_ARGS]) == 0
    return out


@pytest.mark.parametrize("module,prefix,blocked", [
    ("quant", [], ("vllm", "vllm_plugins")),
    ("vllm_plugins.cli", ["quantize"], ("vllm",)),
], ids=["python-m-quant", "vllm-plugins-quantize"])
def test_quantize_without_vllm(source, reference, tmp_path, assert_same_export, run_blocked, module, prefix, blocked):
    model, calib = source
    out = tmp_path / "out"
    proc = run_blocked(module, [*prefix, "--model", str(model), "--out", str(out), "--calib", str(calib),
                                 *QUANT_ARGS], blocked)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_export(out, reference)


def test_blocker_blocks(run_blocked):
    """The harness itself: a program that imports vLLM fails under it (else the test above proves nothing)."""
    proc = run_blocked("vllm_plugins.registration", [], ("vllm",))
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr, proc.stderr[-2000:]


def _module_file(name: str) -> Path | None:
    """The source file of first-party module ``name`` (a package's ``__init__.py``), or None."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of every module ``path`` imports anywhere (functions included), with their parents."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)  # ``from pkg import submodule``
    for name in list(names):
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


def forbidden_imports(root_package: str = "quant") -> dict[str, list[str]]:
    """``{module: [chain of first-party modules leading to it]}`` for every forbidden module reachable
    from the modules of ``root_package``."""
    from models.hf_registration import HF_CONFIGS

    dynamic = {t.partition(":")[0] for pair in HF_CONFIGS.values() for t in pair if t}
    start = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
             for p in sorted((REPO / root_package).rglob("*.py"))]
    chains = {m: [m] for m in start}
    todo, found = list(start), {}
    while todo:
        mod = todo.pop()
        path = _module_file(mod)
        if path is None:
            continue
        targets = _imports(path, mod)
        if mod == "models.hf_registration":
            targets |= dynamic
        for target in sorted(targets):
            top = target.split(".")[0]
            if top in FORBIDDEN:
                found.setdefault(target, chains[mod] + [target])
            elif top in FIRST_PARTY and target not in chains:
                chains[target] = chains[mod] + [target]
                todo.append(target)
    return found


def test_quant_imports_no_vllm_statically():
    found = forbidden_imports()
    assert not found, "quant/ reaches vLLM: " + "; ".join(" -> ".join(chain) for chain in found.values())


def test_static_walk_sees_vllm_imports():
    """The walk must find the plugin's own vLLM imports (else an empty result proves nothing)."""
    found = forbidden_imports("vllm_plugins")
    assert any(name.startswith("vllm.") for name in found)
