"""Orchestration: calibrate and quantize one decoder layer at a time, write the exports.

For each decoder layer: materialise it from the shards in the calibration dtype
(float32, or bfloat16 for a bfloat16 checkpoint; see ``quant.model.calibration_dtype``), find its
linears' *input groups* (linears fed the same tensor, e.g. q/k/v) in call
order, then quantize group after group (true-sequential): the Hessian of a
group is accumulated from a forward pass that already uses the quantized
weights of the earlier groups, and stops at the group's input (with
``true_sequential=False``, one pass over the unquantized layer gives every
group's Hessian, as llm-compressor and GPTQModel calibrate). In true-sequential
order the later passes replay the layer's finished modules from the group inputs
the earlier passes captured instead of recomputing them (:mod:`quant.replay`).
Finally the layer's quantized output becomes the next layer's input, the layer's tensors
are written to one shard per format, and the layer goes back to ``meta``.
On a CUDA ``--device`` the layer, its Hessians and GPTQ run on the device and
the results are offloaded before writing (:mod:`quant.device`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import json
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quant.calib import calibration_samples, load_tokenizer
from quant.checks import check_plan, check_scale_range
from quant.checkpoint import (ShardReader, ShardWriter, StoredTensor, atomic_output_dir, check_output_dir,
                              copy_side_files)
from quant.config import LayerScheme, QuantConfig
from quant.device import Placement, peak_device_memory_mb, resolve_device
from quant.errors import QuantInputError
from quant.export import linear_tensors, quantization_config, write_format_files
from quant.gptaq import FloatStream, asymmetric_targets
from quant.gptq import (HessianError, PreparedHessian, QuantResult, accumulate_hessian, gptq_quantize_shared,
                        gptq_workers, mirror_lower, prepare_hessian, rtn_quantize, single_threaded, smoothquant_scales)
from quant.model import DecoderSkeleton, calibration_dtype, run_layer
from quant.output_error import queue_energies, record_errors
from quant.replay import ReplayCache, find_replays

BATCH_TOKENS = 4096
# Forward temporaries of a batch: about this many float32 values per [tokens, width] activation
# (32 MiB), so wide layers (an MLP of 5632 channels) run fewer tokens at a time than BATCH_TOKENS.
BATCH_ELEMENTS = 8192 * 1024


def _batch_samples(layer: nn.Module, seqlen: int) -> int:
    """Samples per forward batch: BATCH_TOKENS tokens, fewer when the layer's widest linear is wide."""
    widest = max((max(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear)), default=1)
    return max(1, min(BATCH_TOKENS, BATCH_ELEMENTS // widest) // seqlen)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS creeps up per layer)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _mmap_large_allocations() -> None:
    """Serve allocations of 1 MiB and more with their own mmap, unmapped again when freed.

    glibc raises its mmap threshold up to 32 MiB after the first large free, and
    the activations and Hessians of a layer then fragment the heap: about 180 MiB
    of freed memory stayed resident on the 1B benchmark model. A fixed threshold
    keeps the resident set at what is alive (no measurable time cost there).
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


class _Background:
    """Work off the critical path (the relative output errors, :class:`quant.output_error.OutputError`) done on a second
    core while the main thread factorizes a Hessian and runs GPTQ's column loop, which use one core.

    Jobs queue up in order (:meth:`add`); inside :meth:`window` one extra thread with one intra-op
    thread runs them until the window closes (the job it is on is finished, the rest wait for the next
    window: jobs are small, a few milliseconds, so the main thread hardly waits); :meth:`drain` runs
    what is left. Disabled, :meth:`add` runs the job at once.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.jobs: collections.deque = collections.deque()

    def add(self, job) -> None:
        if self.enabled:
            self.jobs.append(job)
        else:
            job()

    @contextlib.contextmanager
    def window(self):
        """Run queued jobs on another thread while the block runs on one core (torch and BLAS single-threaded)."""
        with single_threaded():
            if not self.jobs:
                yield
                return
            stop, failed = threading.Event(), []

            def work():
                torch.set_num_threads(1)  # per thread under OpenMP/MKL: a new thread starts at the default
                try:
                    while self.jobs and not stop.is_set():
                        self.jobs.popleft()()
                except Exception as exc:  # noqa: BLE001 - re-raised on the main thread below
                    failed.append(exc)

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            try:
                yield
            finally:
                self._close(stop, worker)
            if failed:
                raise failed[0]

    def _close(self, stop: threading.Event, worker: threading.Thread) -> None:
        """End a window: the worker finishes the job in hand (the main thread waits for it) and stops."""
        stop.set()
        worker.join()

    def drain(self) -> None:
        """Run what is left here, on one intra-op thread as in a window: the same results wherever a job ran."""
        with single_threaded():
            while self.jobs:
                self.jobs.popleft()()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include a parent's peak before exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class LayerStats:
    index: int
    seconds: float
    peak_rss_mb: float
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative output error

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / max(1, len(self.errors))

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


@dataclass
class QuantReport:
    layers: list[LayerStats]
    seconds: float
    peak_rss_mb: float
    outputs: dict[str, Path]
    num_samples: int
    calib_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    peak_device_mb: float | None = None  # CUDA: peak memory allocated on the device

    def summary(self) -> str:
        lines = [f"{'layer':>5}  {'mean rel. err':>13}  {'max rel. err':>12}  {'time s':>7}  {'peak RSS MiB':>12}"]
        for s in self.layers:
            lines.append(f"{s.index:>5}  {s.mean_error:>13.3e}  {s.max_error:>12.3e}  {s.seconds:>7.2f}  {s.peak_rss_mb:>12.0f}")
        lines.append(f"{'all':>5}  {'':>13}  {'':>12}  {self.seconds:>7.2f}  {self.peak_rss_mb:>12.0f}")
        lines.append("rel. err = tr(dW H dW^T) / tr(W H W^T) per linear on the calibration inputs "
                     f"({self.num_samples} samples, forward passes in {str(self.calib_dtype).removeprefix('torch.')} "
                     f"on {self.device})")
        if self.peak_device_mb is not None:
            lines.append(f"peak {self.device} memory: {self.peak_device_mb:.0f} MiB")
        for fmt, out in self.outputs.items():
            lines.append(f"wrote {fmt}: {out}")
        return "\n".join(lines)


class _Stop(Exception):
    pass


@dataclass
class _Group:
    names: list[str]
    norm: nn.Module | None  # the module whose output is the group's input (a norm with a 1-D weight)


@dataclass
class _Recording:
    """One forward of a layer on one sample: each submodule's output and call count, each linear's input."""

    outputs: dict[str, object] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    linear_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _discover_groups(layer: nn.Module, prefix: str, hidden: torch.Tensor, kwargs: dict,
                     placement: Placement) -> tuple[list[_Group], _Recording]:
    """Linears of ``layer`` grouped by identical input tensor, in call order, and the recorded forward."""
    calls: list[tuple[str, torch.Tensor]] = []
    produced: list[tuple[nn.Module, torch.Tensor]] = []
    rec = _Recording()

    def record(name: str):
        def hook(_mod, _args, out):
            rec.outputs[name] = out
            rec.calls[name] = rec.calls.get(name, 0) + 1
        return hook

    hooks = []
    for name, mod in layer.named_modules():
        if not name:
            continue
        hooks.append(mod.register_forward_hook(record(name)))
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: calls.append((n, a[0]))))
        elif isinstance(getattr(mod, "weight", None), nn.Parameter) and mod.weight.dim() == 1:
            hooks.append(mod.register_forward_hook(lambda m, a, o: produced.append((m, o))))
    try:
        run_layer(layer, hidden[:1].to(placement.device, copy=True), kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[torch.Tensor, _Group]] = []
    for name, x in calls:
        rec.linear_inputs[name] = x
        full = f"{prefix}.{name}"
        match = next((g for t, g in groups if t is x), None)
        if match is None:
            norm = next((m for m, o in produced if o is x and m.weight.shape[0] == x.shape[-1]), None)
            groups.append((x, _Group([full], norm)))
        elif full not in match.names:
            match.names.append(full)
    return [g for _, g in groups], rec


def _group_statistics(layer, firsts: list[nn.Linear], hidden, kwargs, want_absmax: list[bool],
                      placement: Placement, cache: ReplayCache | None = None, group: int = 0,
                      on_input=None) -> list[tuple]:
    """``(H, per-channel |x| max or None)`` of the input of each of ``firsts`` (in call order), from one
    forward pass per batch that stops at the input of the last of them.

    With ``cache`` (true-sequential: ``firsts`` is the one linear of plan group ``group``), the pass
    replays the finished modules of the earlier groups and keeps this group's input where a replay needs it.
    ``on_input(i, rows, x)`` (GPTAQ) also sees the input ``x`` of ``firsts[i]`` on the batch ``rows``.
    """
    states = [{"h": None, "n": 0, "absmax": None} for _ in firsts]
    lower_only = placement.device.type == "cpu"  # ssyrk: one triangle per batch, mirrored once after the pass

    current = {"rows": slice(0, 0)}

    def make_hook(state: dict, absmax: bool, last: bool, i: int):
        def hook(_mod, args):
            x = args[0].detach()
            if on_input is not None:
                on_input(i, current["rows"], x)
            state["h"], state["n"] = accumulate_hessian(state["h"], state["n"], x, mirror=not lower_only)
            if absmax:
                m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                state["absmax"] = m if state["absmax"] is None else torch.maximum(state["absmax"], m)
            if cache is not None:
                cache.keep(group, x)
            if last:
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(make_hook(st, a, i == len(firsts) - 1, i))
               for i, (m, st, a) in enumerate(zip(firsts, states, want_absmax))]
    step = _batch_samples(layer, hidden.shape[1])
    replaying = cache.replaying(layer, group) if cache is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), replaying:
            for rows, batch in placement.batches(hidden, step):
                current["rows"] = rows
                if cache is not None:
                    cache.rows = rows
                with contextlib.suppress(_Stop):
                    layer(batch, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if lower_only:
        for st in states:
            mirror_lower(st["h"])
    return [(st["h"], st["absmax"]) for st in states]


def quantize_layer(layer: nn.Module, prefix: str, hidden: torch.Tensor, kwargs: dict,
                   schemes: dict[str, LayerScheme | None], config: QuantConfig,
                   placement: Placement = Placement(torch.device("cpu")), background: _Background | None = None,
                   stream: FloatStream | None = None,
                   ) -> tuple[dict[str, QuantResult], dict[str, float], ReplayCache | None]:
    """Quantize the linears of one materialised layer in place (weights become their dequantized values).

    ``layer`` and ``kwargs`` are on ``placement.device``; ``hidden`` is where ``placement`` keeps it.
    The results stay on the device. Returns the results, the relative output errors and the replays
    (true-sequential) that :func:`_propagate` uses for the layer's output. With an enabled ``background``,
    the errors are filled in later, while later groups (or layers) are factorized and quantized.
    With ``stream`` (GPTAQ: the layer's float inputs recorded), GPTQ runs on :func:`asymmetric_targets`."""
    background = background or _Background(False)
    # The cores a GPTQ window leaves idle: one runs the queued errors, the others split the column loop.
    gptq_threads = gptq_workers(placement.device, reserve=int(background.enabled))
    modules = dict(layer.named_modules())
    results: dict[str, QuantResult] = {}
    errors: dict[str, float] = {}
    plan = []  # (group, quantized names, SmoothQuant?) in call order
    groups, recording = _discover_groups(layer, prefix, hidden, kwargs, placement)
    for group in groups:
        todo = [n for n in group.names if schemes.get(n) is not None]
        if todo:
            smooth = (config.smoothquant is not None and group.norm is not None
                      and all(schemes[n].spec.act_bits is not None for n in todo) and len(todo) == len(group.names))
            plan.append((group, todo, smooth))
    first = [modules[todo[0][len(prefix) + 1:]] for _, todo, _ in plan]
    # Not true-sequential: every group's statistics from one pass over the unquantized layer.
    one_pass = not config.true_sequential and plan
    names0 = [todo[0][len(prefix) + 1:] for _, todo, _ in plan]
    cross = None if stream is None else (lambda i, rows, x, base=0: stream.accumulate(names0[base + i], rows, x))
    stats = _group_statistics(layer, first, hidden, kwargs, [p[2] for p in plan], placement,
                              on_input=cross) if one_pass else None
    cache = None if one_pass else _replay_cache(layer, prefix, plan, recording, hidden, config, placement)
    for index, (group, todo, smooth) in enumerate(plan):
        linears = {n: modules[n[len(prefix) + 1:]] for n in todo}
        if stats is None:  # true-sequential: the earlier groups of this layer are quantized already
            on_input = None if cross is None else functools.partial(cross, base=index)
            h, absmax = _group_statistics(layer, [first[index]], hidden, kwargs, [smooth], placement, cache, index,
                                          on_input)[0]
        else:
            (h, absmax), stats[index] = stats[index], None
        if smooth:
            s = smoothquant_scales(absmax, [m.weight for m in linears.values()], config.smoothquant)
            with torch.no_grad():
                group.norm.weight.div_(s)
                for m in linears.values():
                    m.weight.mul_(s)
            h = h / s.unsqueeze(1) / s.unsqueeze(0)
            if stream is not None:  # D, like H, in the smoothed inputs x / s
                stream.cross[names0[index]] = stream.cross[names0[index]] / s.unsqueeze(1) / s.unsqueeze(0)
        if config.method == "gptq":
            # The errors' denominators tr(W H Wᵀ) (H is needed by nothing else after the factorization).
            # GPTAQ: GPTQ's loss measures the targets, not W, so its errors take the products (after the window).
            pending = queue_energies(background, linears, h) if stream is None else None
            # Factorization and column loop on one core; the queued error jobs on another.
            with background.window():
                try:  # one inverse Hessian for every linear of the group
                    prepared = prepare_hessian(h, config.damp_percent, config.act_order, config.max_damp_retries,
                                               lapack=placement.lapack)
                except HessianError as exc:
                    raise HessianError(f"{', '.join(todo)}: {exc}") from None
                targets = {}  # GPTAQ: GPTQ runs on the least-squares targets of the float model's outputs
                if stream is not None:
                    targets = dict(zip(todo, asymmetric_targets([linears[n].weight for n in todo],
                                                                stream.cross[names0[index]], h,
                                                                config.damp_percent, config.gptaq_alpha)))
                else:
                    del h  # the queued jobs hold it until they have run
                by_scheme: dict[LayerScheme, list[str]] = {}
                for name in todo:
                    by_scheme.setdefault(schemes[name], []).append(name)
                for scheme, names in by_scheme.items():  # one column loop for all linears of a scheme
                    outs = gptq_quantize_shared([targets.get(n, linears[n].weight) for n in names], None, scheme,
                                                block_size=config.block_size, act_order=config.act_order,
                                                prepared=prepared, clip_ratios=config.clip_ratios,
                                                workers=gptq_threads)
                    results.update(zip(names, outs))
                del outs, targets
            if stream is not None:  # GPTAQ: the products, before the weights are overwritten below
                record_errors(errors, [(n, linears[n].weight.detach(), results[n]) for n in todo], h)
                del h, prepared
            else:  # the numerators from GPTQ's losses, after the denominators' chunks
                prepared = PreparedHessian(prepared.dead, prepared.perm, None, damping=prepared.damping)  # factor freed
                for name in todo:
                    if background.enabled:  # queued: the weight is overwritten below (copied only now)
                        pending[name].keep_weight()
                    background.add(functools.partial(pending[name].finish, errors, name, results[name], prepared))
                del prepared, pending
        else:
            results.update((name, rtn_quantize(linears[name].weight, schemes[name])) for name in todo)
            record_errors(errors, [(n, linears[n].weight.detach(), results[n]) for n in todo], h)  # no background
            del h
        for name in todo:
            with torch.no_grad():
                results[name].dequantize_into(linears[name].weight)
        _release_freed_memory()
    return results, errors, cache


def _replay_cache(layer: nn.Module, prefix: str, plan: list, recording: _Recording, hidden: torch.Tensor,
                  config: QuantConfig, placement: Placement) -> ReplayCache | None:
    """The replays of a true-sequential layer (:mod:`quant.replay`) within ``config.replay_cache_mb``."""
    budget = placement.cache_budget(config.replay_cache_mb * 2**20)
    if budget <= 0:
        return None
    # A SmoothQuant group's input and weights are rescaled after its pass: nothing replays from it.
    linear_group = {n[len(prefix) + 1:]: i for i, (_, todo, smooth) in enumerate(plan) if not smooth for n in todo}
    replays = find_replays(layer, recording.outputs, recording.calls, recording.linear_inputs, linear_group)
    if not replays:
        return None
    widths = {i: recording.linear_inputs[todo[0][len(prefix) + 1:]].shape[-1] for i, (_, todo, _) in enumerate(plan)}
    return ReplayCache(replays, hidden, widths, budget, placement.device)


def _layer_export(fmt: str, skeleton: DecoderSkeleton, i: int, layer: nn.Module,
                  results: dict[str, QuantResult], config: QuantConfig) -> dict[str, torch.Tensor]:
    prefix = skeleton.layer_name(i)
    out: dict[str, torch.Tensor] = {}
    quantized_weights = {f"{n}.weight" for n in results}
    for key, value in layer.state_dict().items():
        full = f"{prefix}.{key}"
        if full in quantized_weights or full not in skeleton.reader.entries:
            continue
        out[full] = value.to(device="cpu", dtype=skeleton.source_dtype(full))
    for name, res in results.items():
        out.update(linear_tensors(fmt, name, res, config.act_order))
    return out


def plan_schemes(skeleton: DecoderSkeleton, config: QuantConfig) -> dict[str, LayerScheme | None]:
    """The scheme of every decoder-layer linear, checked against its shape before any work."""
    schemes: dict[str, LayerScheme | None] = {}
    for i in range(skeleton.num_layers):
        for name, lin in skeleton.layer_linears(i).items():
            s = config.scheme_for(name)
            if s is not None and s.spec.grouped and s.group_size != -1 and lin.in_features % s.group_size:
                flag = "--group-size" if s == config.default_scheme else "--override"
                raise QuantInputError(f"{flag} {s.group_size} does not divide the input size {lin.in_features} of {name}")
            if s is not None and lin.in_features % s.spec.pack_factor:
                raise QuantInputError(f"{name}: input size {lin.in_features} is not a multiple of "
                                      f"{s.spec.pack_factor} (int{s.bits} packing)")
            schemes[name] = s
    if config.format == "gptq" and any(s is None for s in schemes.values()):
        raise QuantInputError("--format gptq cannot leave decoder-layer linears unquantized (--ignore)")
    check_plan(config, schemes, [*schemes, *skeleton.non_layer_linears()],
               getattr(skeleton.config.get_text_config(), "max_position_embeddings", None))
    return schemes


def quantize_checkpoint(model_dir: str | Path, outputs: dict[str, Path] | str | Path, config: QuantConfig,
                        calib: str | Path | None = None, *, force: bool = False, progress: bool = True,
                        samples: torch.Tensor | None = None, placement: Placement | None = None,
                        transformers_layers: bool = False) -> QuantReport:
    """Quantize ``model_dir`` once and write one export per format.

    ``outputs`` maps format -> directory, or is one directory for ``config.format``.
    ``samples`` (int64 ``[n, seqlen]``) replaces tokenizing ``calib``.
    ``placement`` replaces the one ``config.device`` gives (tests force the device branches on the CPU).
    ``transformers_layers`` calibrates with transformers' layers where :mod:`quant.llama_layers` would
    (tests compare the exports of both).
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if not isinstance(outputs, dict):
        outputs = {config.format: Path(outputs)}
    outputs = {fmt: Path(p) for fmt, p in outputs.items()}
    for fmt in outputs:
        config.replace(format=fmt)  # validates the scheme/format pairing
    device = placement.device if placement is not None else resolve_device(config.device)
    reader = ShardReader(model_dir)
    for out in outputs.values():
        check_output_dir(out, model_dir, force)
    skeleton = DecoderSkeleton(model_dir, reader, calibration_dtype(config.calib_dtype, reader), transformers_layers)
    schemes = plan_schemes(skeleton, config)
    if samples is None:
        if calib is None:
            raise QuantInputError("--calib is required")
        samples = calibration_samples(calib, load_tokenizer(model_dir), config.num_samples, config.seqlen, config.seed)
    non_layer_linears = skeleton.non_layer_linears()
    layer_prefix = skeleton.layers_prefix + "."
    other_names = [n for n in reader.names() if not n.startswith(layer_prefix)]
    stats: list[LayerStats] = []
    # The errors on a second core while GPTQ runs on one (CPU, GPTQ, more than one thread).
    background = _Background(device.type == "cpu" and config.method == "gptq" and torch.get_num_threads() > 1)

    with contextlib.ExitStack() as stack:
        tmp = {fmt: stack.enter_context(atomic_output_dir(out, force)) for fmt, out in outputs.items()}
        writers = {fmt: ShardWriter(d, skeleton.num_layers + 1) for fmt, d in tmp.items()}
        _mmap_large_allocations()
        with reader.open():
            hidden, layer_kwargs = skeleton.capture_layer_inputs(samples)
            if placement is None:
                copies = 2 if config.gptaq else 1  # GPTAQ keeps the float model's hidden states too
                placement = Placement.for_run(device, copies * hidden.numel() * hidden.element_size())
            hidden = placement.place_activations(hidden)
            stream = FloatStream(hidden) if config.gptaq else None
            bar = tqdm(range(skeleton.num_layers), desc="quantize", unit="layer", disable=not progress)
            for i in bar:
                t_layer = time.perf_counter()
                layer = placement.onload(skeleton.load_layer(i))
                check_scale_range(skeleton.layer_linears(i), schemes, reader)
                kwargs = placement.onload(layer_kwargs[i])
                if stream is not None:  # the float layer's inputs and output, before it is quantized
                    prefix = skeleton.layer_name(i) + "."
                    quantized = {n.removeprefix(prefix) for n, s in schemes.items()
                                 if s is not None and n.startswith(prefix)}
                    stream.record_layer(layer, kwargs, placement.batches, _batch_samples(layer, hidden.shape[1]),
                                        quantized)
                results, errors, cache = quantize_layer(layer, skeleton.layer_name(i), hidden, kwargs, schemes,
                                                        config, placement, background, stream)
                if stream is not None:
                    stream.release()
                results = {name: res.to("cpu") for name, res in results.items()}  # offload for writing
                for fmt, writer in writers.items():
                    writer.write_shard(_layer_export(fmt, skeleton, i, layer, results, config))
                del results
                hidden = _propagate(layer, hidden, kwargs, placement, cache)
                del cache
                skeleton.unload_layer(i)
                _release_freed_memory()
                stats.append(LayerStats(i, time.perf_counter() - t_layer, peak_rss_mb(), errors))
                bar.set_postfix(err=f"{stats[-1].mean_error:.2e}")  # the errors computed so far
            background.drain()
            del hidden, stream
            rest = {name: StoredTensor(reader, name) for name in other_names}  # streamed, checked for NaN/Inf
            for writer in writers.values():
                writer.write_shard(rest)
                writer.finish()
        source_config = json.loads((model_dir / "config.json").read_text())
        for fmt, d in tmp.items():
            cfg = dict(source_config)
            cfg["quantization_config"] = quantization_config(fmt, config, schemes, non_layer_linears)
            (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            copy_side_files(model_dir, d)
            write_format_files(fmt, d, cfg["quantization_config"])
    return QuantReport(stats, time.perf_counter() - t0, peak_rss_mb(), outputs, int(samples.shape[0]), skeleton.dtype,
                       str(device), peak_device_memory_mb(device))


def _propagate(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, placement: Placement,
               cache: ReplayCache | None = None) -> torch.Tensor:
    """The layer's (quantized) output on every sample, written over its input (where ``placement`` keeps it),
    with every replay of ``cache`` in place of its module."""
    step = _batch_samples(layer, hidden.shape[1])
    replaying = cache.replaying(layer) if cache is not None else contextlib.nullcontext()
    with torch.no_grad(), replaying:
        for rows, batch in placement.batches(hidden, step):
            if cache is not None:
                cache.rows = rows
            y = layer(batch, **kwargs)
            hidden[rows] = (y[0] if isinstance(y, tuple) else y).to(hidden.device)
    return hidden
