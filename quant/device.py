"""Where a quantization run keeps its tensors (``--device auto|cpu|cuda[:N]``).

Per decoder layer the pipeline onloads the layer to :attr:`Placement.device`,
runs the calibration forwards, Hessians, the float64 factorization and GPTQ
there, and offloads the integers and scales to the CPU for writing. The
calibration activations of all samples stay on the device while they fit
(:data:`ACTIVATION_SHARE` of the free device memory); otherwise they live in
pinned CPU memory and every forward batch is copied over.

On the CPU every move is a no-op and the run is the CPU path as it always
was; only the LAPACK factorization (:attr:`Placement.lapack`, scipy
``potrf``/``trtri``) is CPU-only. Tests force
the device branches on the CPU with an explicit :class:`Placement`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from quant.errors import QuantInputError

# Keep every sample's activations on the device when they need at most this share of its free memory.
ACTIVATION_SHARE = 0.5


def resolve_device(choice: str) -> torch.device:
    """``--device``: ``auto`` is the current CUDA device when CUDA is available, else the CPU."""
    if choice == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(choice)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantInputError(f"--device {choice}: CUDA is not available (torch {torch.__version__}, "
                                  f"{torch.cuda.device_count()} CUDA devices); use --device cpu")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise QuantInputError(f"--device {choice}: there are only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", index)
    return device


@dataclass(frozen=True)
class Placement:
    """Where one run computes and where it keeps the calibration activations."""

    device: torch.device
    activations_on_device: bool = True  # else in CPU memory (pinned when CUDA exists), copied per batch
    lapack: bool = True  # scipy potrf/trtri in float64 on the CPU; else torch.linalg on ``device``

    @classmethod
    def for_run(cls, device: torch.device, activation_bytes: int) -> "Placement":
        if device.type == "cpu":
            return cls(device)
        return cls(device, activations_on_device=activation_bytes <= ACTIVATION_SHARE * free_memory(device),
                   lapack=False)

    def place_activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` where :attr:`activations_on_device` says (the CPU copy is dropped when it moves)."""
        if self.activations_on_device:
            return hidden.to(self.device)
        if torch.cuda.is_available() and not hidden.is_pinned():
            return hidden.pin_memory()
        return hidden

    def batches(self, hidden: torch.Tensor, step: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, hidden[rows] on the device)`` in batches of ``step`` samples.

        Activations kept off the device come as a copy even when the device is the CPU (as a
        transfer to a GPU would), so that a CPU test of the device branches sees what a GPU run does.
        """
        copy = not self.activations_on_device
        for s in range(0, hidden.shape[0], step):
            rows = slice(s, s + step)
            yield rows, hidden[rows].to(self.device, non_blocking=True, copy=copy)

    def cache_budget(self, requested_bytes: float) -> float:
        """Bytes the replay cache (:mod:`quant.replay`) may take where the activations live: the request,
        on a CUDA device no more than :data:`ACTIVATION_SHARE` of its free memory."""
        if self.device.type == "cuda" and self.activations_on_device:
            return min(requested_bytes, ACTIVATION_SHARE * free_memory(self.device))
        return requested_bytes

    def onload(self, obj):
        """``obj`` (a module, a tensor, or dicts/tuples/lists of tensors) on the device."""
        return to_device(obj, self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def to_device(obj, device: torch.device):
    """Tensors and modules inside dicts, tuples and lists moved to ``device``; anything else as it is."""
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def free_memory(device: torch.device) -> int:
    """Bytes the caching allocator could still get on ``device`` (its free memory plus its own cached blocks)."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def peak_device_memory_mb(device: torch.device) -> float | None:
    """Peak memory allocated on a CUDA ``device`` by this process, or None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
