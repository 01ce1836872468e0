"""Turning a full dump into a lattice dump, streaming: ``compact_dump``.

A full dump holds each utterance's ``(T, U+1, V)`` logits; its lattice dump (see
``dump.py``) only ``blank_lp (T, U+1)``, ``emit_lp (T, U)`` and ``log_p2_others
(T, U+1)``, computed by the engine's stage 1 (``Engine.lattice_terms``) with the
dump's blank and input_kind; a TDT dump's (``model_kind="tdt"``, logits ``(T,
U+1, V + D)``) ``blank_lp``, ``emit_lp`` and ``dur_lp (T, U+1, D)``, by the TDT
engine's stage 1 with the dump's durations. ``compact_dump`` reads the selected utterances in
padded batches within a memory budget, as ``score`` does (one reused buffer, raw
data with ``preadv``), and hands each batch to a ``DumpWriter(kind="lattice")``,
which runs the engine on the batch's device and keeps only the small arrays: the
whole file is never in memory, and the lattice dump scores to the same bits as
the full dump (float64 logits give a float64 lattice, others float32).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from .checks import normalise_blank
from .dump import DumpError, DumpWriter
from .reader import DumpReader, check_memory, group_by_budget, padded_bytes, show
from .score import DEFAULT_BATCH_BYTES, _load_batch


def _known_v(reader: DumpReader) -> int | None:
    """The V of the reader's logits without reading any: the dump's vocabulary size, else
    the first utterance's (None for a dump without utterances that records none)."""
    if reader.vocab_size > 0:
        return reader.vocab_size
    ids = reader.utt_ids
    try:
        return reader.info(ids[0]).V if ids else None
    except DumpError:  # reported when (and if) that utterance is selected
        return None


def lattice_writer_for(reader: DumpReader, path: str | os.PathLike, **kw) -> DumpWriter:
    """A ``DumpWriter(path, kind="lattice")`` for ``compact_dump`` of ``reader``: the
    reader's blank (as an index in ``[0, V)``), vocab, input_kind, V and frame shift
    (``DumpReader.frame_shift``; a bad stored one is the reader's ``DumpError``).

    ``kw`` go to ``DumpWriter`` (``compression``, ``lattice_dtype``, ``backend``:
    give the one ``compact_dump`` will run). Raises ``DumpError`` for a lattice
    dump ("already a lattice dump") and for a blank outside ``[-V, V)``; the
    writer's own errors (``DumpWriteError`` for a path that cannot be written,
    ValueError for a bad argument).
    """
    if reader.kind == "lattice":
        raise DumpError(f"{reader.name}: already a lattice dump")
    V = _known_v(reader)
    blank = reader.blank
    if V is not None:
        blank = normalise_blank(reader.blank, V)
        if blank is None:
            raise DumpError(f"{reader.name}: blank = {reader.blank} is outside [-V, V) for "
                            f"V = {V}")
    return DumpWriter(path, blank=blank, vocab=reader.vocab, input_kind=reader.input_kind,
                      kind="lattice", vocab_size=V, frame_shift=reader.frame_shift,
                      model_kind=reader.model_kind, durations=reader.durations, **kw)


def _check_pair(reader: DumpReader, writer: DumpWriter, backend: str) -> None:
    """Refuse a writer that would not store ``reader``'s lattice as ``backend`` computes it."""
    if reader.kind == "lattice":
        raise DumpError(f"{reader.name}: already a lattice dump")
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'cpu' or 'cuda', got {backend!r}")
    if getattr(writer, "kind", None) != "lattice":
        raise ValueError("compact_dump writes into a DumpWriter(kind='lattice')")
    if (getattr(writer, "model_kind", "rnnt"), getattr(writer, "durations", None)) != (
            reader.model_kind, reader.durations):
        raise ValueError(f"the writer's model_kind {writer.model_kind!r} (durations "
                         f"{writer.durations}) is not the dump's {reader.model_kind!r} "
                         f"(durations {reader.durations})")
    if writer.input_kind != reader.input_kind:
        raise ValueError(f"the writer's input_kind {writer.input_kind!r} is not the dump's "
                         f"{reader.input_kind!r}")
    V = writer.vocab_size if writer.vocab_size is not None else _known_v(reader)
    if V is not None and normalise_blank(writer.blank, V) != normalise_blank(reader.blank, V):
        raise ValueError(f"the writer's blank {writer.blank} is not the dump's {reader.blank} "
                         f"(V = {V})")
    from .devices import tensor_device

    runs = writer.backend
    if runs == "auto":  # what "auto" picks for the batches compact_dump hands it
        runs = "cuda" if tensor_device(backend) == "cuda" else "cpu"
    if runs != backend:
        raise ValueError(f"compact_dump(backend={backend!r}) but the writer runs the "
                         f"{runs!r} engine (DumpWriter(backend={writer.backend!r})); make it "
                         f"with backend={backend!r}")


def compact_dump(
    reader: DumpReader,
    utt_ids: Sequence[str],
    writer: DumpWriter,
    *,
    backend: str = "cpu",
    budget_bytes: int = DEFAULT_BATCH_BYTES,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Write the lattice of each of ``utt_ids`` of the full dump ``reader`` (keyed or
    padded layout) into ``writer``; returns the number written.

    ``writer`` is a ``DumpWriter(kind="lattice")`` with the reader's blank, vocab
    and input_kind (``lattice_writer_for`` makes one) whose backend runs
    ``backend``: ``"cpu"``, or ``"cuda"`` (each batch moved to the GPU; under
    Numba's simulator the batch stays on the CPU and the writer needs
    ``backend="cuda"``). Every selected utterance is validated before any is
    read (``DumpReader.checked``; an id given twice is written once); then padded
    batches of ``group_by_budget`` (``budget_bytes`` of logits, a larger
    utterance alone) are read into one
    reused buffer and written with ``writer.add_batch``, in the reader's batch
    order (by size; a dump lists its utterances by name whatever the order
    they were written in), with each utterance's stored ``loss`` and ``text``.
    ``on_batch(n)`` is called after each batch of ``n`` utterances.

    The caller closes ``writer`` (use it as a context manager: an exception here,
    KeyboardInterrupt from ``on_batch`` included, then leaves no file). Raises
    ``DumpError`` for bad input (a lattice dump: "already a lattice dump"; any
    selected utterance the reader refuses) before anything is written, and
    when the file changes while it is read; ValueError for a writer that does
    not match the dump, and for an utterance with NaN or +inf in its logits (a
    lattice dump cannot store them; that batch is not written); the writer's
    ``DumpWriteError`` when the output cannot be written.
    """
    _check_pair(reader, writer, backend)
    # An id selected twice is written once (a dump holds each utterance once).
    utt_ids = list(dict.fromkeys(utt_ids))
    items = reader.checked(utt_ids)  # validates every utterance before reading any
    sizes = sorted({info.V for info, _ in items})
    if len(sizes) > 1:
        raise DumpError(f"{reader.name}: the selected utterances have different vocabulary "
                        f"sizes {sizes}; a lattice dump records one")
    if sizes and writer.vocab_size is not None and writer.vocab_size != sizes[0]:
        raise ValueError(f"the writer's vocabulary size is {writer.vocab_size}, the dump's "
                         f"{sizes[0]}")
    groups = list(group_by_budget(items, budget_bytes))
    if not groups:
        return 0
    largest = max(groups, key=lambda g: padded_bytes([i for i, _ in g]))
    size = padded_bytes([i for i, _ in largest])
    what = (f"{reader.name}: utterance {show(largest[0][0].utt_id)}: its logits"
            if len(largest) == 1 else
            f"{reader.name}: a batch of {len(largest)} utterances (the batch budget)")
    check_memory(size, what + " would")
    store = np.empty(size, np.uint8)
    to_gpu = False
    if backend == "cuda":
        from .devices import tensor_device

        to_gpu = tensor_device(backend) == "cuda"
    written = 0
    for group in groups:
        logits, labels, t_len, u_len = _load_batch(reader, group, store)
        infos = [info for info, _ in group]
        losses = [info.attrs.get("loss") for info in infos]
        texts = [info.attrs.get("text") for info in infos]
        if to_gpu:  # pragma: no cover - needs a GPU
            import torch

            logits = torch.from_numpy(logits).to("cuda")
        writer.add_batch(logits, labels, t_len, u_len, [info.utt_id for info in infos],
                         losses=losses if any(v is not None for v in losses) else None,
                         texts=texts if any(v is not None for v in texts) else None)
        del logits
        written += len(group)
        if on_batch is not None:
            on_batch(len(group))
    return written


__all__ = ["compact_dump", "lattice_writer_for"]
