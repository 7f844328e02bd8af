"""The weight broadcast's data layout: a manifest of named tensors and the flat byte buckets that carry them.

No I/O here; ``weight_sync`` moves these buffers. Invariants:

- A bucket is a flat ``uint8`` buffer; its tensors sit at 64-byte-aligned offsets (any dtype may follow any
  other) and are rebuilt on the receiving side as views, without a copy.
- :func:`plan_buckets` is deterministic and order-preserving: both sides compute the same plan from the same
  manifest, so only the manifest travels, never offsets. A tensor bigger than the bucket size travels alone in a
  bucket of its own size; every other bucket stays within the size.
- Tied weights travel once: a tensor that *is* an earlier one (same storage, offset, shape, strides, dtype) is an
  alias in the manifest; the receiver yields the same view under both names.
- Byte buckets rather than one bucket per dtype: per-dtype buckets would either reorder tensors away from the
  layer order that vLLM's layer-wise reload wants, or fragment buckets for models that interleave dtypes.

Usage::

    entries = entries_of(named)                         # manifest rows, aliases marked
    plan = plan_buckets(entries, bucket_bytes)          # the same on both sides
    flat = pack(plan[0], tensors_of_bucket_0, buffer)   # sender
    unpack(plan[0], flat)                               # receiver: [(name, view), ...]
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALIGN = 64
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
}


@dataclass(frozen=True)
class TensorEntry:
    """One manifest row: what the receiver needs to rebuild a tensor (or, for an alias, which one it repeats)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    alias_of: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: 0 for an alias."""
        return 0 if self.alias_of else math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Bucket:
    """A flat byte buffer: ``slots`` are (entry, byte offset), offsets aligned to :data:`ALIGN`."""

    slots: tuple[tuple[TensorEntry, int], ...]
    nbytes: int


def entries_of(named: Sequence[tuple[str, torch.Tensor]]) -> list[TensorEntry]:
    """Manifest rows for ``named``; a tensor identical to an earlier one (a tied weight) becomes its alias."""
    seen: dict[tuple, str] = {}
    out = []
    for name, t in named:
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"weight_sync: {name} has dtype {t.dtype}, which the broadcast does not carry")
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        alias = seen.get(key) if t.numel() else None
        out.append(TensorEntry(name, dtype, tuple(t.shape), alias))
        if alias is None and t.numel():
            seen[key] = name
    return out


def plan_buckets(entries: Sequence[TensorEntry], bucket_bytes: int) -> list[Bucket]:
    """Greedy, order-preserving packing of the non-alias entries; the same on both sides."""
    buckets: list[Bucket] = []
    slots: list[tuple[TensorEntry, int]] = []
    end = 0
    for e in entries:
        if e.alias_of:
            continue
        offset = -(-end // ALIGN) * ALIGN
        if slots and offset + e.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), end))
            slots, offset = [], 0
        slots.append((e, offset))
        end = offset + e.nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), end))
    return buckets


def encode_manifest(entries: Sequence[TensorEntry], bucket_bytes: int) -> bytes:
    rows = [[e.name, e.dtype, list(e.shape), *([e.alias_of] if e.alias_of else [])] for e in entries]
    return json.dumps({"bucket_bytes": bucket_bytes, "tensors": rows}, separators=(",", ":")).encode()


def decode_manifest(data: bytes) -> tuple[list[TensorEntry], int]:
    """Inverse of :func:`encode_manifest`; raises ``ValueError`` on anything malformed."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or set(doc) != {"bucket_bytes", "tensors"}:
        raise ValueError("manifest: expected keys bucket_bytes, tensors")
    bucket_bytes, rows = doc["bucket_bytes"], doc["tensors"]
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0 or not isinstance(rows, list):
        raise ValueError("manifest: bad bucket_bytes or tensors")
    entries: list[TensorEntry] = []
    sources: dict[str, TensorEntry] = {}
    for row in rows:
        ok = isinstance(row, list) and len(row) in (3, 4) and isinstance(row[0], str) and row[1] in DTYPES
        ok = ok and isinstance(row[2], list) and all(isinstance(d, int) and d >= 0 for d in row[2])
        entry = TensorEntry(row[0], row[1], tuple(row[2]), row[3] if len(row) == 4 else None) if ok else None
        if entry is None or (entry.alias_of is not None and not _same_layout(entry, sources.get(entry.alias_of))):
            raise ValueError(f"manifest: bad tensor entry {str(row)[:200]}")
        if entry.alias_of is None:
            sources[entry.name] = entry
        entries.append(entry)
    if len({e.name for e in entries}) != len(entries):
        raise ValueError("manifest: duplicate tensor names")
    return entries, bucket_bytes


def _same_layout(alias: TensorEntry, source: TensorEntry | None) -> bool:
    return source is not None and (source.dtype, source.shape) == (alias.dtype, alias.shape)


def aliases_of(entries: Sequence[TensorEntry]) -> dict[str, list[str]]:
    """{source name: [alias names]} for the receiver to yield tied weights under every name."""
    out: dict[str, list[str]] = {}
    for e in entries:
        if e.alias_of:
            out.setdefault(e.alias_of, []).append(e.name)
    return out


def pack(bucket: Bucket, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy ``tensors`` (in slot order) into the uint8 buffer ``out[:bucket.nbytes]`` and return that view."""
    flat = out[: bucket.nbytes]
    for (entry, offset), t in zip(bucket.slots, tensors, strict=True):
        view(flat, entry, offset).copy_(t.detach())
    return flat


def view(flat: torch.Tensor, entry: TensorEntry, offset: int) -> torch.Tensor:
    """The tensor ``entry`` inside the uint8 buffer ``flat`` at ``offset``, without a copy."""
    return flat[offset : offset + entry.nbytes].view(DTYPES[entry.dtype]).view(entry.shape)


def unpack(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(entry.name, view(flat, entry, offset)) for entry, offset in bucket.slots]


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:
    _UNSHARED_REFS = _storage_refs(torch.empty(1))
except Exception:  # the private API is gone: never reuse a buffer (always correct, a little slower)
    _UNSHARED_REFS = -1


class BufferPool:
    """Receive buffers, reused only when no tensor still views them.

    vLLM's layer-wise reload keeps the tensors of a layer until all of that layer's weights arrived, and a
    loader may even keep a received tensor as a parameter: a buffer is handed out again only when its storage
    has no other reference (otherwise a new one is allocated). Reuse saves page-faulting fresh memory on every
    update; :meth:`trim` keeps at most ``keep`` free buffers between updates.
    """

    def __init__(self, device: torch.device, keep: int = 3) -> None:
        self.device, self.keep = device, keep
        self._bufs: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        for buf in self._bufs:
            if buf.numel() >= nbytes and self._free(buf):
                return buf[:nbytes]
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._bufs.append(buf)
        return buf[:nbytes]

    def trim(self) -> None:
        free = sorted((b for b in self._bufs if self._free(b)), key=lambda b: -b.numel())
        self._bufs = free[: self.keep]

    @staticmethod
    def _free(buf: torch.Tensor) -> bool:
        return _UNSHARED_REFS > 0 and _storage_refs(buf) <= _UNSHARED_REFS
