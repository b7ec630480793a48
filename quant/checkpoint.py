"""Reading and writing safetensors checkpoints without materialising a model.

:class:`ShardReader` parses every shard's header up front (so a truncated
file is an error before any work) and reads tensors with plain positioned
reads from file handles opened once per pass — no mmap, so the resident set
holds only the tensors the caller keeps. :class:`ShardWriter` writes the
output shards one at a time. :func:`atomic_output_dir` gives a temporary
directory that is renamed onto the output only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.errors import QuantInputError
from quant.outdir import is_taken, staged_output_dir

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


class ShardReader:
    """Tensor names, shapes and dtypes of a checkpoint directory, and their bytes on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise QuantInputError(f"--model {self.dir}: no such directory")
        if not (self.dir / "config.json").is_file():
            raise QuantInputError(f"--model {self.dir}: no config.json")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise QuantInputError(f"{index}: not a safetensors index ({exc})") from None
            shards = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise QuantInputError(f"--model {self.dir}: no model.safetensors or model.safetensors.index.json")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for shard in shards:
            self._parse(self.dir / shard)
        self._handles: dict[Path, object] = {}

    def _parse(self, path: Path) -> None:
        if not path.is_file():
            raise QuantInputError(f"{path}: shard listed in the index is missing")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantInputError(f"{path}: truncated safetensors file (no header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8:
                # A header that starts as JSON was cut short; anything else is not a safetensors header.
                if f.read(1) != b"{":
                    raise QuantInputError(f"{path}: corrupt safetensors file (its first bytes are not a "
                                          "safetensors header)")
                raise QuantInputError(f"{path}: truncated safetensors file (header of {hlen} bytes, file of {size})")
            try:
                header = json.loads(f.read(hlen))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise QuantInputError(f"{path}: corrupt safetensors header") from None
            if not isinstance(header, dict):
                raise QuantInputError(f"{path}: corrupt safetensors header")
        base = 8 + hlen
        end = base
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(meta.get("dtype"))
            if dtype is None:
                raise QuantInputError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')}")
            start, stop = meta["data_offsets"]
            end = max(end, base + stop)
            self.entries[name] = (path, dtype, tuple(meta["shape"]), base + start, base + stop)
        if end > size:
            raise QuantInputError(f"{path}: truncated safetensors file ({size} bytes, the header needs {end})")

    def check_tensor(self, name: str, shape: tuple[int, ...], floating: bool) -> None:
        """The stored ``name`` has the shape the model's config gives it and, for a float parameter,
        a float dtype (integers would be quantized as if they were weights)."""
        path, dtype, stored, _, _ = self.entries[name]
        if tuple(stored) != tuple(shape):
            raise QuantInputError(f"{path}: tensor {name} has shape {list(stored)}, but config.json makes it "
                                  f"{list(shape)}")
        if floating and not dtype.is_floating_point:
            raise QuantInputError(f"{path}: tensor {name} is stored as {_DTYPE_NAMES[dtype]}, expected a float "
                                  "dtype (F32, F16 or BF16)")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1]

    def total_bytes(self) -> int:
        return sum(e[4] - e[3] for e in self.entries.values())

    @contextlib.contextmanager
    def open(self):
        """One pass: each shard is opened at most once, then closed at exit."""
        try:
            yield self
        finally:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def read(self, name: str) -> torch.Tensor:
        path, dtype, shape, start, stop = self.entries[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb")  # noqa: SIM115 - closed by open()'s exit
        buf = torch.empty(stop - start, dtype=torch.uint8)
        handle.seek(start)
        if handle.readinto(memoryview(buf.numpy())) != stop - start:
            raise QuantInputError(f"{path}: truncated while reading {name}")
        return buf.view(dtype).reshape(shape)

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique int64) of the 2-D tensor ``name``, read one by one."""
        path, dtype, shape, start, stop = self.entries[name]
        if len(shape) != 2 or (rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < shape[0]):
            raise QuantInputError(f"{path}: tensor {name} of shape {list(shape)} has no rows {rows.min()}..{rows.max()}")
        row_bytes = (stop - start) // shape[0]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb")  # noqa: SIM115 - closed by open()'s exit
        buf = torch.empty(rows.numel(), row_bytes, dtype=torch.uint8)
        for i, r in enumerate(rows.tolist()):
            handle.seek(start + r * row_bytes)
            if handle.readinto(memoryview(buf[i].numpy())) != row_bytes:
                raise QuantInputError(f"{path}: truncated while reading {name}")
        return buf.view(dtype)

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors grouped by shard, in file order."""
        order = sorted(names, key=lambda n: (str(self.entries[n][0]), self.entries[n][3]))
        return {n: self.read(n) for n in order}


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
COPY_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a :class:`ShardReader`, copied to an output shard in chunks, never loaded whole."""

    reader: ShardReader
    name: str


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` without a copy (a contiguous copy only when ``t`` is not contiguous)."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _copy_stored(src: StoredTensor, out) -> None:
    """Chunked copy with the NaN/Inf check of a full read, at most ``COPY_CHUNK_BYTES`` in memory."""
    path, dtype, _, start, stop = src.reader.entries[src.name]
    item = torch.empty(0, dtype=dtype).element_size()
    step = max(item, COPY_CHUNK_BYTES // item * item)
    with open(path, "rb") as f:
        f.seek(start)
        for pos in range(start, stop, step):
            n = min(step, stop - pos)
            buf = torch.empty(n, dtype=torch.uint8)
            if f.readinto(memoryview(buf.numpy())) != n:
                raise QuantInputError(f"{path}: truncated while reading {src.name}")
            if dtype.is_floating_point and not torch.isfinite(buf.view(dtype)).all():
                raise QuantInputError(f"{path}: tensor {src.name} has NaN or Inf values")
            out.write(memoryview(buf.numpy()))


class ShardWriter:
    """Writes ``model-0000i-of-0000N.safetensors`` one shard at a time, then the index.

    Shards are written straight from the tensors' memory (``safetensors.save_file``
    would first copy every tensor into a bytes object); a :class:`StoredTensor`
    is streamed from its source shard.
    """

    def __init__(self, out_dir: Path, num_shards: int):
        self.dir = out_dir
        self.num_shards = num_shards
        self.index: dict[str, str] = {}
        self.total_size = 0
        self._next = 1

    def write_shard(self, tensors: dict[str, torch.Tensor | StoredTensor]) -> None:
        if self._next > self.num_shards:
            raise RuntimeError("more shards written than announced")
        name = f"model-{self._next:05d}-of-{self.num_shards:05d}.safetensors"
        self._next += 1
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, value in tensors.items():
            if isinstance(value, StoredTensor):
                _, dtype, shape, start, stop = value.reader.entries[value.name]
                size = stop - start
            else:
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise QuantInputError(f"exported tensor {key} has NaN or Inf values; nothing was written")
                dtype, shape, size = value.dtype, tuple(value.shape), value.numel() * value.element_size()
            header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.dir / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for value in tensors.values():
                if isinstance(value, StoredTensor):
                    _copy_stored(value, f)
                else:
                    f.write(_tensor_bytes(value))
        for key in tensors:
            self.index[key] = name
        self.total_size += offset

    def finish(self) -> None:
        if self._next != self.num_shards + 1:
            raise RuntimeError(f"wrote {self._next - 1} shards of {self.num_shards}")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.index.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def find_non_finite(ckpt_dir: Path) -> tuple[str, str] | None:
    """``(shard file name, tensor name)`` of the first float tensor of a safetensors checkpoint
    directory with a NaN or Inf value, or ``None``: the check of an artifact before it is published."""
    reader = ShardReader(ckpt_dir)
    with reader.open():  # one tensor in memory at a time, in file order
        for name in sorted(reader.names(), key=lambda n: (str(reader.entries[n][0]), reader.entries[n][3])):
            if reader.dtype(name).is_floating_point and not bool(torch.isfinite(reader.read(name)).all()):
                return reader.entries[name][0].name, name
    return None


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template... every top-level non-weight file but config.json."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in SKIP_FILES and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)


def check_output_dir(out: Path, source: Path, force: bool) -> None:
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise QuantInputError(f"--out {out}: must not be the source checkpoint, inside it or contain it")
    if is_taken(out) and not force:  # an empty directory is taken over
        raise QuantInputError(f"--out {out}: already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise QuantInputError(f"--out {out}: exists and is not a directory")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool):
    """:func:`quant.outdir.staged_output_dir`, with ``--force`` replacing an output that
    appeared meanwhile (and a clear error otherwise)."""
    written = False
    try:
        with staged_output_dir(out, replace=force) as tmp:
            yield tmp
            written = True
    except FileExistsError:
        if not written:
            raise
        raise QuantInputError(f"--out {out}: appeared while quantizing (pass --force to replace it)") from None
