"""Benchmark: this package's GPTQ toolkit vs llm-compressor and GPTQModel, side by side.

    /work/main/.venv/bin/python scripts/bench_quant.py --models tinystories,100m [--models 1b]

For each model and scheme, every tool quantizes the *same* calibration token
windows (drawn once by ``quant.calib``) in their own subprocess; the parent
records wall time and the child's peak RSS, then evaluates every export with
the same torch dequantized reference (``quant.evaluate``) on held-out
TinyStories text. The peers run each from its own virtual environment
``.venv-peers/<name>`` (created on first use, torch pinned to 2.13.0 through a
constraints file; never in the main environment): llm-compressor 0.14.0.1
(``llmcompressor``) and GPTQModel 7.6.0 (``gptqmodel``, w4a16 only, run with
``GPTQMODEL_CPU_WORKERS=2``). ``--tools`` picks among this toolkit's variants,
llm-compressor (``actorder=None``), llm-compressor-static (its own default, static
activation order) and gptqmodel.

``1b`` generates a ~1.1B-parameter random Llama saved as bf16 shards
(without materialising it) and reports this toolkit's peak RSS as a fraction
of the checkpoint size; the peers are not run on it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_VENVS = REPO / ".venv-peers"  # one venv per peer: .venv-peers/<name> (git-ignored)
PEER_PINS = {
    "llmcompressor": ["llmcompressor==0.14.0.1"],
    # 7.7.0 needs torch >= 2.14.1; 7.6.0 wants transformers 5.19.0
    "gptqmodel": ["gptqmodel==7.6.0", "transformers==5.19.0"],
}
CONSTRAINTS = "torch==2.13.0\n"
SHARED = Path(os.environ.get("VLLM_PLUGINS_SHARED", REPO.parent / "shared"))

MODELS = {
    # name: (how to get it, scheme list)
    "tinystories": dict(group_size=64),
    # llama2.c stories260K converted (vllm-plugins convert), saved as a plain LlamaForCausalLM (same logits) so that
    # the peers load it. Its MLP width 172 is no multiple of 8: int4 cannot pack down_proj, every tool leaves it float.
    # Inputs of 64: --group-size 64 is one group per row; 128 does not divide them.
    "stories260k": dict(group_size=64, ignore=["*.down_proj"]),
    "100m": dict(group_size=128, hidden_size=768, intermediate_size=2048, num_hidden_layers=14,
                 num_attention_heads=12, num_key_value_heads=4),
    "1b": dict(group_size=128, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
# --depth-check: the 1b model's width at these depths (peak RSS must not grow with depth)
DEPTH_SPEC = {k: v for k, v in MODELS["1b"].items() if k != "num_hidden_layers"}

HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

# The same imports as `python -m quant` (quant.cli.run): the pipeline, with the unused packages hidden.
OURS_CHILD = HWM + """
import json, sys, time, torch
from quant.config import QuantConfig
from quant.imports import unused_modules_hidden
model, out, scheme, group, samples, options = sys.argv[1:7]
options = json.loads(options)  # QuantConfig fields
with unused_modules_hidden():
    from quant.pipeline import quantize_checkpoint
    from quant.checkpoint import ShardReader
    from quant.model import DecoderSkeleton
    DecoderSkeleton(model, ShardReader(model))  # imports the model code the run uses (a meta model: no memory)
base = hwm()
samples = torch.load(samples)
cfg = QuantConfig(scheme=scheme, group_size=int(group), format="compressed-tensors",
                  num_samples=samples.shape[0], seqlen=samples.shape[1], **options)
t1 = time.perf_counter()
with unused_modules_hidden():
    report = quantize_checkpoint(model, out, cfg, samples=samples, force=True, progress=False)
print(report.summary(), file=sys.stderr)
print("RESULT " + json.dumps({"quant_s": time.perf_counter() - t1, "import_rss_mb": base,
      "peak_rss_mb": hwm()}))
"""

LLMC_CHILD = HWM + """
import json, os, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
model_dir, out, scheme, group, samples, ignore = sys.argv[1:7]
ignore = json.loads(ignore)
base = hwm()
samples = torch.load(samples)
ds = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
if scheme == "w4a16":
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
              "strategy": "group", "group_size": int(group)}}}
    # actorder: None (plain column order, like ours) unless LLMC_ACTORDER is set ("static": GPTQModifier's own default)
    recipe = GPTQModifier(config_groups=groups, ignore=ignore, actorder=os.environ.get("LLMC_ACTORDER") or None,
                          dampening_frac=0.01, block_size=128)
else:
    recipe = GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore, dampening_frac=0.01, block_size=128)
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=samples.shape[0],
        max_seq_length=samples.shape[1], shuffle_calibration_samples=False)
model.save_pretrained(out, save_compressed=True)
print("RESULT " + json.dumps({"quant_s": time.perf_counter() - t1, "import_rss_mb": base,
      "peak_rss_mb": hwm()}))
"""


GPTQMODEL_CHILD = HWM + """
import json, os, sys, time, torch
model_dir, out, scheme, group, samples = sys.argv[1:6]  # (argv[6]: the ignore list, only ["lm_head"] here)
if scheme != "w4a16":
    sys.exit(f"GPTQModel: no {scheme} scheme comparable to this toolkit's (W8A8 = int8 weights + per-token int8 activations)")
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
base = hwm()
samples = torch.load(samples)
calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in samples]
t1 = time.perf_counter()
# offload_to_disk=False: the default lazy loader builds a meta-device shell and materialises modules from the
# checkpoint by name, so a checkpoint that stores a tied embedding only as lm_head.weight (TinyStories-656K)
# leaves embed_tokens on meta ("Tensor.item() cannot be called on meta tensors"). Loading eagerly to CPU, as
# llm-compressor does, avoids it. dtype: the checkpoint's own (GPTQModel's CPU default would be bfloat16).
cfg = json.load(open(os.path.join(model_dir, "config.json")))
dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
# act_group_aware=False: GPTQModel enables its group-aware activation reordering (GAR) by default for GPTQ;
# the other tools run plain GPTQ in column order (llm-compressor actorder=None).
qcfg = QuantizeConfig(bits=4, group_size=int(group), desc_act=False, sym=True, damp_percent=0.01,
                      act_group_aware=False, offload_to_disk=False)
model = GPTQModel.load(model_dir, qcfg, backend=BACKEND.TORCH, dtype=dtype)
model.quantize(calib, batch_size=1, calibration_sort=None, backend=BACKEND.TORCH)
model.save(out)
print("RESULT " + json.dumps({"quant_s": time.perf_counter() - t1, "import_rss_mb": base,
      "peak_rss_mb": hwm()}))
"""

# tool -> (venv under .venv-peers, child script, extra environment, schemes it runs)
PEERS = {
    "llm-compressor": ("llmcompressor", LLMC_CHILD, {}, ("w4a16", "w8a8")),
    # GPTQModifier's own default for w4a16: static activation order (columns by decreasing diag(H), scales
    # fixed beforehand from the unmodified weight by its minmax observer, as in every llm-compressor mode)
    "llm-compressor-static": ("llmcompressor", LLMC_CHILD, {"LLMC_ACTORDER": "static"}, ("w4a16",)),
    # GPTQModel stops on a 2-core machine unless its CPU worker count is set. Its GPTQ is weight-only, so it
    # has no counterpart to W8A8 (int8 weights *and* per-token int8 activations): w4a16 only.
    "gptqmodel": ("gptqmodel", GPTQMODEL_CHILD, {"GPTQMODEL_CPU_WORKERS": "2"}, ("w4a16",)),
}
# this toolkit's variants -> QuantConfig fields over its defaults: "seq" true-sequential inside each layer, "1pass"
# every Hessian of a layer from one pass over the unquantized layer (as the peers calibrate), "clip" with the
# clipping search of every group's scale (--clip-search), else amax scales; "recompute": no replays (same export)
OURS = {"ours": {},
        "ours-recompute": {"replay_cache_mb": 0},  # the defaults without the replays of quant.replay
        "ours-seq": {"true_sequential": True, "clip_search": False},
        "ours-1pass": {"true_sequential": False, "clip_search": False},
        "ours-seq-clip": {"true_sequential": True, "clip_search": True},
        "ours-1pass-clip": {"true_sequential": False, "clip_search": True},
        "ours-gptaq": {"gptaq": True}}  # the defaults with GPTAQ's asymmetric calibration (--gptaq)
TOOLS = (*OURS, *PEERS)


def ensure_peer_venv(name: str) -> Path:
    """The python of ``.venv-peers/<name>``, created on first use with ``PEER_PINS[name]`` and torch pinned.

    A venv whose install failed is left without its ``.complete`` marker and rebuilt on the next call.
    """
    venv = PEER_VENVS / name
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists():
        return python
    if python.exists() and installed(python, PEER_PINS[name]):  # a venv made before the marker existed
        marker.write_text(" ".join(PEER_PINS[name]) + "\n")
        return python
    PEER_VENVS.mkdir(parents=True, exist_ok=True)
    constraints = PEER_VENVS / "constraints.txt"
    constraints.write_text(CONSTRAINTS)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-c", str(constraints), *PEER_PINS[name]], check=True)
    marker.write_text(" ".join(PEER_PINS[name]) + "\n")
    return python


def installed(python: Path, pins: list[str]) -> bool:
    """Whether ``python`` has every ``name==version`` of ``pins``."""
    check = ("import sys\nfrom importlib.metadata import version\n"
             "sys.exit(any(version(p.split('==')[0]) != p.split('==')[1] for p in sys.argv[1:]))")
    return subprocess.run([str(python), "-c", check, *pins], capture_output=True).returncode == 0


def run_child(python: str, code: str, args: list[str], log: Path, env: dict | None = None,
              cwd: Path = REPO) -> dict:
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    with open(log, "w") as f:
        proc = subprocess.run([python, "-c", code, *args], stdout=subprocess.PIPE, stderr=f, text=True,
                              env={**os.environ, **(env or {})}, cwd=cwd)
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    with open(log, "a") as f:
        f.write("\n--- stdout ---\n" + proc.stdout)
    result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        return {"error": f"exit {proc.returncode}: {error_line(log)}", "log": str(log), "wall_s": wall}
    return {**result, "wall_s": wall, "cpu_s": cpu}


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (a load-robust measure of the work
    done: on a shared machine wall time depends on what else runs, CPU time much less so at one thread)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def error_line(log: Path) -> str:
    """The exception line of a failed child's log (its last ``...Error: ...`` line), else its last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").split("\n--- stdout ---")[0].splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln
    return lines[-1] if lines else "(empty log)"


def check_gptq_export(export_dir: Path) -> None:
    """``quant.evaluate`` dequantizes a ``gptq`` export as ``q * scale`` with the symmetric zero point 8.

    That is right for GPTQ v1 (``checkpoint_format: gptq``, qzeros stored as zero - 1 = 7), which GPTQModel
    saves with ``sym=True``; refuse anything else (v2 zeros, asymmetric zeros, act-order) rather than report a
    wrong perplexity.
    """
    import torch

    from quant.checkpoint import ShardReader
    from quant.packing import unpack_gptq_qzeros

    qc = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if qc.get("quant_method") != "gptq" or fmt != "gptq" or not qc.get("sym") or qc.get("desc_act"):
        raise ValueError(f"{export_dir}: not a symmetric GPTQ v1 checkpoint: {qc}")
    reader = ShardReader(export_dir)
    with reader.open():
        for name in reader.names():
            if name.endswith(".qzeros") and not bool((unpack_gptq_qzeros(reader.read(name)) == 7).all()):
                raise ValueError(f"{export_dir}: {name} holds zero points other than 8")
            if name.endswith(".g_idx"):
                g = reader.read(name).long()
                if not bool((g == torch.arange(g.numel()) // qc["group_size"]).all()):
                    raise ValueError(f"{export_dir}: {name} is not in column order")


def generate_llama(out: Path, spec: dict) -> Path:
    """A random Llama saved as bf16 shards, one decoder layer at a time (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from models.tiny import build_tokenizer

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    build_tokenizer(tmp, vocab_size=512)
    h, inter, n = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    heads, kv, vocab = spec["num_attention_heads"], spec["num_key_value_heads"], spec.get("vocab_size", 512)
    hd = h // heads
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hd, vocab_size=vocab, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = n + 1
    index = {}
    for i in range(n):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rnd(heads * hd, h), p + "self_attn.k_proj.weight": rnd(kv * hd, h),
             p + "self_attn.v_proj.weight": rnd(kv * hd, h), p + "self_attn.o_proj.weight": rnd(h, heads * hd),
             p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
             p + "mlp.down_proj.weight": rnd(h, inter),
             p + "input_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(torch.bfloat16),
             p + "post_attention_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(torch.bfloat16)}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        index.update({k: name for k in t})
    t = {"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(t, str(tmp / name), metadata={"format": "pt"})
    index.update({k: name for k in t})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg.save_pretrained(tmp)
    tmp.rename(out)
    return out


def convert_stories260k(out: Path) -> Path:
    """``../shared/models/stories260K`` through ``vllm-plugins convert``'s converter, saved as a plain Llama.

    The converter writes the package's ``llama_variant``; with ``qk_norm`` off and full rotary it computes the
    same logits as ``LlamaForCausalLM`` (checked: max difference 0), which the peers' environments can load.
    """
    from models.convert import convert_llama2c

    if (out / "config.json").exists():
        return out
    src = SHARED / "models" / "stories260K"
    tmp = out.with_name(out.name + ".variant")
    if not (tmp / "config.json").exists():
        convert_llama2c(src / "stories260K.bin", src / "tok512.bin", tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    if cfg.get("qk_norm") or cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{tmp}: not a plain Llama ({cfg})")
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    for key in ("qk_norm", "partial_rotary_factor"):
        cfg.pop(key, None)
        cfg.get("rope_parameters", {}).pop(key, None)
    tmp.rename(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tinystories,100m", help="comma list of tinystories, 100m, 1b")
    ap.add_argument("--schemes", default="w4a16,w8a8", help="schemes for tinystories (others: w4a16)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the calibration windows (perplexity moves by tenths of a percent between draws: "
                         "compare tools over several seeds)")
    ap.add_argument("--seeds", default=None, help="comma list of calibration seeds (overrides --seed); the table "
                    "then shows the mean over seeds")
    ap.add_argument("--group-sizes", default=None,
                    help="comma list of w4a16 group sizes (default: the model's, 64 for tinystories/stories260k, 128 else)")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "bench_quant"))
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help=f"comma list of {', '.join(TOOLS)} (default: all; a peer whose venv cannot be "
                         "installed shows its error in the table)")
    ap.add_argument("--no-peers", action="store_true", help="run every variant of this toolkit, no peer")
    ap.add_argument("--depth-check", metavar="LAYERS", default=None,
                    help="instead of the comparison: this toolkit's peak RSS (default mode, w4a16 g128) on random "
                         "Llamas of hidden 2048 with these comma-separated layer counts, e.g. 2,24 "
                         "(target: the deepest <= 1.1x the shallowest); use a small --num-samples")
    ap.add_argument("--depth-intermediate", type=int, default=MODELS["1b"]["intermediate_size"],
                    help="MLP width of the --depth-check models (default: the 1b model's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL/OpenBLAS threads of every tool's subprocess (default: their own defaults)")
    args = ap.parse_args()

    import torch

    from quant.calib import calibration_samples, load_tokenizer
    from quant.evaluate import load_dequantized_model, load_float_model, perplexity, tokenize_text

    work = Path(args.workdir).resolve()  # the peers run in it (cwd): their paths must not be relative
    work.mkdir(parents=True, exist_ok=True)
    text = (SHARED / "data" / "tinystories_val.txt").read_text()
    cut = text.index("\n\n", int(len(text) * 0.8))
    calib = work / "calib.txt"
    calib.write_text(text[:cut])
    if args.depth_check:
        return depth_check([int(n) for n in args.depth_check.split(",")], work, calib, args)
    tools = list(OURS) if args.no_peers else [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    pythons, install_errors = {tool: sys.executable for tool in OURS}, {}
    for tool in tools:
        if tool in PEERS:
            try:
                pythons[tool] = str(ensure_peer_venv(PEERS[tool][0]))
            except (subprocess.CalledProcessError, OSError) as exc:
                install_errors[tool] = f"install failed: {exc}"
                print(f"{tool} unavailable: {exc}")
    env = {"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    threads = {} if args.threads is None else {
        k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    rows = []
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    for name in args.models.split(","):
        spec = MODELS[name]
        if name == "tinystories":
            model = SHARED / "models" / "TinyStories-656K"
        elif name == "stories260k":
            model = convert_stories260k(work / "stories260k")
        else:
            model = generate_llama(work / f"llama-{name}", spec)
        schemes = args.schemes.split(",") if name in ("tinystories", "stories260k") else ["w4a16"]
        ignore = ["lm_head", *spec.get("ignore", [])]
        tok = load_tokenizer(model)
        eval_tokens = tokenize_text(tok, text[cut:])[: args.eval_tokens]
        fp_ppl = None if name == "1b" else perplexity(load_float_model(model), eval_tokens, seqlen=args.seqlen)
        for seed in seeds:
            samples = calibration_samples(calib, tok, args.num_samples, args.seqlen, seed)
            samples_path = work / f"samples-{name}-{seed}.pt"
            torch.save(samples, samples_path)
            for scheme in schemes:
                groups = [int(g) for g in args.group_sizes.split(",")] if args.group_sizes else [spec["group_size"]]
                hidden = json.loads((model / "config.json").read_text())["hidden_size"]
                for group in (groups if scheme == "w4a16" else [-1]):
                    if group > hidden or hidden % group:
                        print(f"[{name}] w4a16 g{group} skipped: {group} does not divide the hidden size {hidden}")
                        continue
                    label = f"{scheme} g{group}" if scheme == "w4a16" else scheme
                    for tool in tools:
                        if tool in PEERS and (name == "1b" or scheme not in PEERS[tool][3]
                                              or (tool == "gptqmodel" and len(ignore) > 1)):
                            continue
                        row = {"model": name, "scheme": label, "tool": tool, "seed": seed, "fp_ppl": fp_ppl,
                               "model_mb": dir_bytes(model) / 2**20}
                        if tool in install_errors:
                            rows.append({**row, "error": install_errors[tool]})
                            continue
                        code, extra = (OURS_CHILD, env) if tool in OURS else (PEERS[tool][1], PEERS[tool][2])
                        tag = f"{name}-{label.replace(' ', '-')}-{tool}-s{seed}"
                        out = work / tag
                        child_args = [str(model), str(out), scheme, str(group), str(samples_path)]
                        if tool in OURS:
                            child_args.append(json.dumps({"ignore": ignore, **OURS[tool]}))
                        else:  # llm-compressor matches "re:" regular expressions
                            child_args.append(json.dumps([g if g == "lm_head" else "re:" + fnmatch.translate(g)
                                                          for g in ignore]))
                        print(f"[{name} {label} seed {seed}] {tool} ...", flush=True)
                        res = run_child(pythons[tool], code, child_args, work / f"{tag}.log",
                                        env={**threads, **extra},
                                        cwd=REPO if tool in OURS else work)  # GPTQModel writes ./logs/
                        if "error" not in res and name != "1b":
                            try:
                                if tool == "gptqmodel":
                                    check_gptq_export(out)
                                res["ppl"] = perplexity(load_dequantized_model(out), eval_tokens, seqlen=args.seqlen)
                            except Exception as exc:  # noqa: BLE001 - a row per failure, the table goes on
                                res["error"] = f"evaluating the export: {type(exc).__name__}: {exc}"
                        rows.append({**row, **res})
                        print(json.dumps(rows[-1]), flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print_table(rows, args.threads)
    print_legend()
    print(f"threads per tool: {args.threads or 'default'}")
    print(f"calibration: the same {args.num_samples} windows of {args.seqlen} tokens (seeds {seeds}) for every tool and model "
          f"({args.num_samples * args.seqlen} tokens; float32 layer inputs of the 1b model: "
          f"{args.num_samples * args.seqlen * MODELS['1b']['hidden_size'] * 4 / 2**20:.0f} MiB)")
    return 0


def depth_check(depths: list[int], work: Path, calib: Path, args) -> int:
    """Peak RSS of this toolkit (default mode) on random Llamas that differ only in depth."""
    import torch

    from quant.calib import calibration_samples, load_tokenizer

    env = {"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    if args.threads is not None:
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    rows = []
    for n in depths:
        spec = {**DEPTH_SPEC, "num_hidden_layers": n, "intermediate_size": args.depth_intermediate}
        model = generate_llama(work / f"llama-depth-{n}-{args.depth_intermediate}", spec)
        samples = calibration_samples(calib, load_tokenizer(model), args.num_samples, args.seqlen, args.seed)
        samples_path = work / f"samples-depth-{n}.pt"
        torch.save(samples, samples_path)
        print(f"[depth {n}] ours ...", flush=True)
        res = run_child(sys.executable, OURS_CHILD, [str(model), str(work / f"depth-{n}-out"), "w4a16", "128",
                                                     str(samples_path), "{}"], work / f"depth-{n}.log", env=env)
        if "error" in res:
            print(f"depth {n}: {res['error']} (log {res['log']})")
            return 1
        rows.append((n, dir_bytes(model) / 2**20, res))
    print(f"\n{'layers':>6}{'model MiB':>11}{'wall s':>8}{'import RSS MiB':>16}{'peak RSS MiB':>14}{'peak / shallowest':>19}")
    for n, size, r in rows:
        print(f"{n:>6}{size:>11.0f}{r['wall_s']:>8.1f}{r['import_rss_mb']:>16.0f}{r['peak_rss_mb']:>14.0f}"
              f"{r['peak_rss_mb'] / rows[0][2]['peak_rss_mb']:>19.3f}")
    print(f"hidden {DEPTH_SPEC['hidden_size']}, intermediate {args.depth_intermediate}, vocab "
          f"{DEPTH_SPEC['vocab_size']}, bf16; w4a16 g128, default mode; {args.num_samples} x {args.seqlen} "
          "calibration tokens; target: peak RSS of the deepest <= 1.1x the shallowest")
    return 0


def print_table(rows: list[dict], threads: int | None = None) -> None:
    print(f"\n{'model':<12}{'scheme':<11}{'tool':<15}{'seed':>5}{'wall s':>8}{'cpu s':>8}{'quant s':>9}{'peak RSS MiB':>13}"
          f"{'RSS/model':>10}{'ppl':>9}{'fp ppl':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12}{r['scheme']:<11}{r['tool']:<15}{r['seed']:>5} ERROR {r['error'][:300]}")
            continue
        ppl = f"{r['ppl']:9.3f}" if "ppl" in r else f"{'-':>9}"
        fp = f"{r['fp_ppl']:9.3f}" if r.get("fp_ppl") else f"{'-':>9}"
        print(f"{r['model']:<12}{r['scheme']:<11}{r['tool']:<15}{r['seed']:>5}{r['wall_s']:8.1f}{r['cpu_s']:8.1f}{r['quant_s']:9.1f}"
              f"{r['peak_rss_mb']:13.0f}{r['peak_rss_mb'] / r['model_mb']:10.2f}{ppl}{fp}")
    means = mean_over_seeds(rows)
    print(f"\nmean over seeds (sd of ppl):\n{'model':<12}{'scheme':<11}{'tool':<15}{'runs':>5}{'wall s':>8}"
          f"{'quant s':>9}{'ppl':>18}")
    for (m, s, t), r in means.items():
        ppl = f"{r['ppl']:9.3f} ± {r['ppl_sd']:.3f}" if "ppl" in r else f"{'-':>18}"
        print(f"{m:<12}{s:<11}{t:<15}{r['runs']:>5}{r['wall_s']:8.1f}{r['quant_s']:9.1f}{ppl:>18}")
    for ours, peer_tool in [(o, p) for o in OURS for p in PEERS]:
        pairs = [(m, s, r, means.get((m, s, peer_tool))) for (m, s, t), r in means.items() if t == ours]
        pairs = [p for p in pairs if p[3] is not None]
        if not pairs:
            continue
        print(f"\nratios of the means ({ours} / {peer_tool}):")
        for m, s, r, peer in pairs:
            ppl = f"  ppl {r['ppl'] / peer['ppl']:.4f}" if "ppl" in r and "ppl" in peer else ""
            print(f"  {m:<12}{s:<11} wall {r['wall_s'] / peer['wall_s']:.2f}  cpu {r['cpu_s'] / peer['cpu_s']:.2f}"
                  f"  quant {r['quant_s'] / peer['quant_s']:.2f}"
                  f"  peak RSS {r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}{ppl}")
    target = [(s, r, means.get((m, s, "llm-compressor"))) for (m, s, t), r in means.items() if t == "ours" and m == "100m"]
    for s, r, peer in target:
        if peer is not None:
            wall = r["wall_s"] / peer["wall_s"]
            ppl = f", perplexity {r['ppl'] / peer['ppl']:.4f}x" if "ppl" in r and "ppl" in peer else ""
            at = f"--threads {threads}" if threads else f"default threads ({os.cpu_count()} cores)"
            print(f"\nissue 13 item 5, 100m {s}, {at}: ours (default) / llm-compressor wall time {wall:.2f}x "
                  f"(target <= 0.80x: {'met' if wall <= 0.8 else 'NOT met'}), CPU time "
                  f"{r['cpu_s'] / peer['cpu_s']:.2f}x{ppl}, peak RSS {r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x")


def print_legend() -> None:
    print(textwrap.dedent("""
        ours: the defaults (true-sequential with replayed finished modules, clip search); -recompute:
        the same without the replays (--replay-cache-mb 0, same export); -seq: true-sequential inside each layer; -1pass: --no-true-sequential, every
        Hessian of a layer from one pass over the unquantized layer, as the peers calibrate; -clip:
        --clip-search (each group's scale clipped for the least diag(H)-weighted rounding error);
        -gptaq: the defaults with --gptaq (each linear fitted to the float model's outputs, quant.gptaq).
        wall s: the whole subprocess (imports included); cpu s: its user + system CPU time (on a
        loaded machine compare cpu s at --threads 1: wall time then mostly measures the others); quant s: model load + calibration + GPTQ + save.
        RSS/model: peak RSS over the size of the source safetensors. ppl: torch dequantized model on
        held-out TinyStories text (W8A8 with per-token int8 activations). gptqmodel: GPTQModel 7.6.0
        (GPTQ v1 export; w4a16 only, it has no W8A8 with int8 activations), loaded eagerly on CPU
        (offload_to_disk=False) with its group-aware reordering off (act_group_aware=False)."""))


def mean_over_seeds(rows: list[dict]) -> dict[tuple, dict]:
    """(model, scheme, tool) -> means of wall_s, quant_s, peak_rss_mb, ppl (and ppl_sd) over its successful runs."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["model"], r["scheme"], r["tool"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        m = {k: statistics.fmean(r[k] for r in rs) for k in ("wall_s", "cpu_s", "quant_s", "peak_rss_mb")}
        if all("ppl" in r for r in rs):
            m["ppl"] = statistics.fmean(r["ppl"] for r in rs)
            m["ppl_sd"] = statistics.stdev(r["ppl"] for r in rs) if len(rs) > 1 else 0.0
        out[key] = {**m, "runs": len(rs)}
    return out


if __name__ == "__main__":
    sys.exit(main())
