"""Scoring dumps: stream utterances from a ``DumpReader`` through the loss engine.

Without gradients: utterances are batched by size within a memory budget, read
straight into a padded batch buffer (raw data with ``preadv``, the rest by
HDF5; see ``DumpReader``) and scored by ``rnnt_loss(reduction="none")``; the
next batch is read on a helper thread while the engine runs (the CPU kernels
release the GIL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .dump import DumpError
from .engine import ImpossibleLossWarning
from .lattice import negative_loss_tolerance
from .reader import DumpReader, UttInfo, check_memory, group_by_budget, padded_bytes, show

SCORE_FIELDS = ["utt_id", "T", "U", "loss", "loss_per_frame", "loss_per_token"]
STORED_FIELDS = ["stored_loss", "loss_diff"]
DEFAULT_BATCH_BYTES = 64 << 20
LATTICE_BATCH_BYTES = 8 << 20  # a lattice dump's batches at most (they are not size-sorted)


def _load_batch(reader: DumpReader, group: Sequence[tuple[UttInfo, np.ndarray]],
                store: np.ndarray):
    """Padded ``(B, T, U+1, V)`` logits (a view of ``store``; a TDT dump's ``(B, T, U+1,
    V + D)``), ``(B, Umax)`` labels, lengths."""
    infos = [g[0] for g in group]
    B = len(infos)
    T = max(i.T for i in infos)
    U = max(i.U for i in infos)
    V = infos[0].width
    # Reusing one buffer avoids faulting in fresh pages for every batch; the
    # padding is never read, so it need not be cleared.
    logits = store.view(infos[0].dtype)[: B * T * (U + 1) * V].reshape(B, T, U + 1, V)
    labels = np.zeros((B, max(U, 1)), np.int64)
    for b, (info, y) in enumerate(group):
        reader.read_logits_into(info.utt_id, info, logits, np.s_[b, : info.T, : info.U + 1, :])
        labels[b, : info.U] = y
    t_len = np.array([i.T for i in infos], np.int64)
    u_len = np.array([i.U for i in infos], np.int64)
    return logits, labels, t_len, u_len


def _read_lattices(reader: DumpReader, ids: Iterator[str], budget_bytes: int,
                   skip_bad: bool = False, carry: list | None = None) -> list:
    """The next utterances of ``ids`` from a lattice dump, read (and checked) while
    their padded batch (``_lattice_batch_bytes``) stays within ``budget_bytes`` (one
    larger utterance goes alone); the third array (for gradient norms) is not read.
    An utterance read but not fitting is left in ``carry`` (a list kept between
    calls), to start the next batch: batches in input order are padded to their
    longest T and their longest U, which need not be the same utterance's (T = 10^5,
    U = 0 beside T = 1, U = 10^5 would pad to 10^10 nodes). With ``skip_bad`` a bad
    utterance is its ``{"utt_id", "_bad"}`` row instead."""
    carry = [] if carry is None else carry
    got, lats = [], []
    while True:
        if carry:
            lat = carry.pop()
        else:
            u = next(ids, None)
            if u is None:
                break
            try:
                lat = reader.read_lattice(u, names=_LOSS_ARRAYS[reader.model_kind])
            except DumpError as e:
                if not skip_bad:
                    raise
                got.append({"utt_id": u, "_bad": str(e)})
                continue
        if lats and _lattice_batch_bytes([*lats, lat]) > budget_bytes:
            carry.append(lat)
            break
        got.append(lat)
        lats.append(lat)
    return got


# The lattice arrays a loss reads, by model kind (the rest is for gradient norms).
_LOSS_ARRAYS = {"rnnt": ("blank_lp", "emit_lp"), "tdt": ("blank_lp", "emit_lp", "dur_lp")}


def _lattice_batch_bytes(lats: Sequence) -> int:
    """Bytes of the padded ``(B, T, U+1)`` arrays ``_pad_lattices`` makes of ``lats``
    (two; a TDT lattice's also ``dur_lp``, D per node), at most: a batch of mixed
    dtypes is padded per dtype."""
    T = max(lat.info.T for lat in lats)
    U1 = max(lat.info.U for lat in lats) + 1
    item = max(lat.info.dtype.itemsize for lat in lats)
    per_node = 2 + max(lat.info.D for lat in lats)
    return per_node * len(lats) * T * U1 * item


def _pad_lattices(lats: Sequence, dtype):
    """Padded ``(B, T, U+1)`` ``blank_lp`` and ``emit_lp`` (entries outside the lengths are
    never read), ``(B, max(Umax, 1))`` labels, lengths."""
    B = len(lats)
    T = max(lat.info.T for lat in lats)
    U1 = max(lat.info.U for lat in lats) + 1
    # Left uninitialised: the padding is never read, and its pages never touched.
    blank_lp = np.empty((B, T, U1), dtype)
    emit_lp = np.empty((B, T, U1), dtype)
    labels = np.zeros((B, max(U1 - 1, 1)), np.int64)
    for b, lat in enumerate(lats):
        T_b, U_b = lat.info.T, lat.info.U
        blank_lp[b, :T_b, : U_b + 1] = lat.blank_lp
        emit_lp[b, :T_b, :U_b] = lat.emit_lp
        labels[b, :U_b] = lat.labels
    t_len = np.array([lat.info.T for lat in lats], np.int64)
    u_len = np.array([lat.info.U for lat in lats], np.int64)
    if lats[0].dur_lp is None:
        return blank_lp, emit_lp, labels, t_len, u_len
    dur_lp = np.empty((B, T, U1, lats[0].info.D), dtype)
    for b, lat in enumerate(lats):
        dur_lp[b, : lat.info.T, : lat.info.U + 1] = lat.dur_lp
    return blank_lp, emit_lp, labels, t_len, u_len, dur_lp


def _score_lattices(reader, utt_ids, backend, budget_bytes, on_batch, skip_bad=False):
    """Score a lattice dump in one pass, in input order: each utterance's arrays are
    read (and checked) once, on a helper thread, while stage 2 runs on the batch
    before. Stage 2 costs nothing per padded node, so batches are not sorted by size.
    Bad input raises ``DumpError`` mid-way; callers write rows only at the end."""
    ids = iter(list(utt_ids))
    # Batches in input order are padded to their longest utterance: keep them small.
    budget_bytes = min(budget_bytes, LATTICE_BATCH_BYTES)
    carry: list = []  # an utterance read that did not fit its batch: the next one's first
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_lattices, reader, ids, budget_bytes, skip_bad, carry)
        while True:
            got = pending.result()
            if not got:
                return
            pending = pool.submit(_read_lattices, reader, ids, budget_bytes, skip_bad, carry)
            lats = [g for g in got if not isinstance(g, dict)]
            rows = {}
            if lats:  # one utterance larger than the budget goes alone: does its copy fit?
                size = _lattice_batch_bytes(lats)
                what = (f"{reader.name}: utterance {show(lats[0].info.utt_id)}: its padded "
                        "lattice" if len(lats) == 1 else
                        f"{reader.name}: a batch of {len(lats)} utterances' padded lattices")
                try:
                    check_memory(size, what + " would")
                except DumpError as e:
                    if not skip_bad:
                        raise
                    rows = {id(lat): {"utt_id": lat.info.utt_id, "_bad": str(e)}
                            for lat in lats}
                    lats = []
            # Groups of one dtype (a dump may mix float32 and float64 utterances).
            for dtype in dict.fromkeys(lat.info.dtype for lat in lats):
                group = [lat for lat in lats if lat.info.dtype == dtype]
                losses = _lattice_losses(*_pad_lattices(group, dtype), backend=backend,
                                         durations=reader.durations)
                for lat, loss in zip(group, losses, strict=True):
                    rows[id(lat)] = _row(reader, lat.info, float(loss))
            for g in got:  # in input order, the bad ones where they were
                yield g if isinstance(g, dict) else rows[id(g)]
            if on_batch is not None:
                on_batch(len(got))


WINDOW = 256  # utterances scored together and put back in input order (the reorder buffer)


def score_rows(
    selected: Sequence[tuple[DumpReader, Sequence[str]]],
    *,
    backend: str = "cpu",
    budget_bytes: int = DEFAULT_BATCH_BYTES,
    on_batch: Callable[[int], None] | None = None,
    skip_bad: bool = False,
) -> Iterator[dict]:
    """Rows of every ``(reader, utterance ids)`` in ``selected`` as they are scored, in
    input order (file by file, each file's ids in the order given), each with
    ``_file``: the reader's name.

    Per reader ``score_reader``: a full dump's windows are validated, sorted by size
    into batches, scored, and their rows put back in input order, so the first rows
    come after one window, not the whole run.
    """
    for reader, ids in selected:
        for r in score_reader(reader, ids, backend=backend, budget_bytes=budget_bytes,
                              on_batch=on_batch, skip_bad=skip_bad):
            r["_file"] = reader.name
            yield r


def score_dumps(selected, **kw) -> list[dict]:
    """``score_rows`` as a list."""
    return list(score_rows(selected, **kw))


def _score_windows(reader, ids, backend, budget_bytes, on_batch, skip_bad):
    ids = list(ids)
    for start in range(0, len(ids), WINDOW):
        window = ids[start : start + WINDOW]
        items, bad = [], {}
        for u in window:
            try:
                info = reader.info(u)
                items.append((info, reader.labels(u, info)))
            except DumpError as e:
                if not skip_bad:
                    raise
                bad[u] = {"utt_id": u, "_bad": str(e)}
        got = {r["utt_id"]: r for r in _score_batches(
            reader, list(group_by_budget(items, budget_bytes)), backend, on_batch)}
        if bad and on_batch is not None:
            on_batch(len(bad))
        for u in window:
            yield got[u] if u in got else bad[u]


def score_fields(rows: Sequence[dict]) -> list[str]:
    """The fields to show of ``rows``: ``SCORE_FIELDS``, and ``STORED_FIELDS`` when any
    utterance carries the trainer's own loss."""
    return SCORE_FIELDS + (STORED_FIELDS if any("stored_loss" in r for r in rows) else [])


def selection_fields(selected: Sequence[tuple[DumpReader, Sequence[str]]]) -> list[str]:
    """``score_fields`` decided before scoring (a streamed table needs its header
    first): ``STORED_FIELDS`` when any selected utterance carries a stored loss."""
    stored = any(r.has_stored_loss(u) for r, ids in selected for u in ids)
    return SCORE_FIELDS + (STORED_FIELDS if stored else [])


def score_reader(
    reader: DumpReader,
    utt_ids: Sequence[str],
    *,
    backend: str = "cpu",
    budget_bytes: int = DEFAULT_BATCH_BYTES,
    on_batch: Callable[[int], None] | None = None,
    skip_bad: bool = False,
) -> Iterator[dict]:
    """Yield one row per utterance, in input order, as they are scored (fields
    ``SCORE_FIELDS`` [+ ``STORED_FIELDS``]), and ``_problem``: why its loss cannot be
    true (``utterance_problem``), else None.

    ``backend`` is ``"cpu"`` or ``"cuda"``; ``on_batch(n)`` is called after each
    batch of ``n`` utterances (progress). Raises ``DumpError`` for bad input (a
    window is validated before any of it is scored), and when the file changes
    while it is read; with ``skip_bad`` a bad utterance is instead a row holding
    only ``utt_id`` and ``_bad``, the one-line message.

    A full dump goes by windows of ``WINDOW`` utterances, read into padded batches
    within ``budget_bytes`` (a larger one alone, if the memory available holds
    it), the next batch read while the engine scores one; how each utterance is
    read is the reader's choice (``DumpReader(direct=...)``). A lattice dump is
    read in one pass (``_score_lattices``).
    """
    if reader.kind == "lattice":
        return _score_lattices(reader, utt_ids, backend, budget_bytes, on_batch, skip_bad)
    return _score_windows(reader, utt_ids, backend, budget_bytes, on_batch, skip_bad)


def _cpu_losses(reader, logits, targets, logit_lengths, target_lengths) -> np.ndarray:
    """Losses of a validated padded batch on the CPU engine's forward, without torch
    (a second of start-up and 200 MB): rounded as ``rnnt_loss`` rounds them
    (float32 unless the logits are float64), so both give the same bits."""
    from .engine import LossOptions, load_engine

    opts = LossOptions(blank=reader.blank % logits.shape[3],
                       fused=reader.input_kind == "logits")
    state = load_engine("cpu").forward(logits, targets, logit_lengths, target_lengths, opts,
                                       False)
    losses = -state.log_like
    return losses if logits.dtype == np.float64 else _to_float32(losses)


def _lattice_losses(blank_lp, emit_lp, targets, logit_lengths, target_lengths, dur_lp=None,
                    *, backend, durations=None) -> np.ndarray:
    """Losses of a lattice dump's padded batch: stage 2 alone on ``backend`` (no torch on
    the CPU), rounded as scoring the logits rounds them, so a lattice dump scores to
    the bits of the full dump it came from. With ``dur_lp`` ``(B, T, U+1, D)`` (a TDT
    lattice dump) the TDT engine's ``forward_compact`` with ``durations``."""
    from .engine import load_engine

    arrays = (blank_lp, emit_lp, targets, logit_lengths, target_lengths)
    if dur_lp is not None:
        arrays = (blank_lp, emit_lp, dur_lp, targets, logit_lengths, target_lengths)
    if backend == "cuda":
        import torch

        from .devices import tensor_device

        arrays = [torch.from_numpy(a).to(tensor_device(backend)) for a in arrays]
    if dur_lp is not None:
        from .tdt_lattice import load_tdt_engine

        blank, emit, dur, *index = arrays
        state = load_tdt_engine(backend).forward_compact(blank, emit, dur, durations, *index,
                                                         False)
    else:
        state = load_engine(backend).forward_compact(*arrays, False)
    log_like = state.log_like
    if not isinstance(log_like, np.ndarray):
        log_like = log_like.cpu().numpy()
    losses = -log_like
    return losses if blank_lp.dtype == np.float64 else _to_float32(losses)


def _to_float32(losses: np.ndarray) -> np.ndarray:
    """float64 losses rounded to float32 as the engine rounds them: one beyond float32's
    range is inf (its row reports it), without numpy's overflow warning."""
    with np.errstate(over="ignore"):
        return losses.astype(np.float32)


def _torch_losses(reader, logits, targets, logit_lengths, target_lengths,
                  backend, loss_fn=None, **extra) -> np.ndarray:
    """Losses of a padded batch by ``loss_fn`` (default ``rnnt_loss``; ``extra`` its other
    keywords) on ``backend``'s device."""
    import torch

    from .devices import tensor_device

    if loss_fn is None:
        from .loss import rnnt_loss as loss_fn
    tensors = [torch.from_numpy(a) for a in (logits, targets, logit_lengths, target_lengths)]
    if tensor_device(backend) == "cuda":  # else: the simulator's CPU tensors
        tensors = [a.to("cuda", non_blocking=True) for a in tensors]
    with torch.no_grad(), _quiet_nonfinite():
        return loss_fn(
            *tensors, blank=reader.blank, reduction="none",
            fused_log_softmax=reader.input_kind == "logits", backend=backend, validate=True,
            **extra,
        ).cpu().numpy()


def _batch_losses(reader, batch, backend) -> np.ndarray:
    """Losses of a padded batch of a full dump, by the dump's model kind."""
    if reader.model_kind == "tdt":
        return _tdt_losses(reader, *batch, backend)
    if backend == "cuda":
        return _torch_losses(reader, *batch, backend)
    return _cpu_losses(reader, *batch)


def _tdt_losses(reader, logits, targets, logit_lengths, target_lengths,
                backend) -> np.ndarray:
    """TDT losses of a padded batch ``(B, T, U+1, V + D)`` with the dump's durations:
    on the CPU the TDT engine's forward without torch, rounded as ``tdt_loss`` rounds
    them; on CUDA ``tdt_loss`` itself."""
    if backend != "cuda":
        from .tdt_lattice import TDTOptions, load_tdt_engine

        V = logits.shape[3] - len(reader.durations)
        opts = TDTOptions(blank=reader.blank % V, durations=reader.durations,
                          fused=reader.input_kind == "logits")
        state = load_tdt_engine("cpu").forward(logits, targets, logit_lengths,
                                               target_lengths, opts, False)
        losses = -state.log_like
        return losses if logits.dtype == np.float64 else _to_float32(losses)
    from .tdt import tdt_loss

    return _torch_losses(reader, logits, targets, logit_lengths, target_lengths, backend,
                         tdt_loss, durations=reader.durations)


def _score_batches(reader, groups, backend, on_batch):
    if not groups:
        return
    # Two buffers: the engine scores one while the helper thread fills the other.
    largest = max(groups, key=lambda g: padded_bytes([i for i, _ in g]))
    size = padded_bytes([i for i, _ in largest])
    what = (f"{reader.name}: utterance {show(largest[0][0].utt_id)}: its logits"
            if len(largest) == 1 else
            f"{reader.name}: a batch of {len(largest)} utterances (--batch-mb)")
    check_memory(size * (2 if len(groups) > 1 else 1), what + " would")
    stores = [np.empty(size, np.uint8), np.empty(size if len(groups) > 1 else 0, np.uint8)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, reader, groups[0], stores[0])
        for k, group in enumerate(groups):
            batch = pending.result()
            if k + 1 < len(groups):
                pending = pool.submit(_load_batch, reader, groups[k + 1], stores[(k + 1) % 2])
            losses = _batch_losses(reader, batch, backend)
            del batch
            for (info, _), loss in zip(group, losses, strict=True):
                yield _row(reader, info, float(loss))
            if on_batch is not None:
                on_batch(len(group))


def input_eps(reader: DumpReader, dtype) -> float:
    """The rounding a dump's stored values carry into the loss: their dtype's epsilon
    for log-probs (used as they are), 0 for logits (normalised in the lattice type)."""
    return float(np.finfo(dtype).eps) if reader.input_kind == "log_probs" else 0.0


def loss_problem(loss: float, T: int, U: int, float64: bool = False,
                 input_eps: float = 0.0, tdt: bool = False) -> str | None:
    """Why an utterance's loss cannot be a true ``-log P(y|x)``, in words; None if it can.

    NaN (NaN or +inf in the logits), +inf (no alignment has non-zero
    probability), or negative beyond rounding (``negative_loss_tolerance``, with
    ``input_eps`` from ``input_eps()``; ``tdt``: a TDT lattice's, twice that, as each
    arc adds a token and a duration log-prob).
    """
    if math.isnan(loss):
        return "loss is nan (NaN or +inf in its logits)"
    if math.isinf(loss):
        return f"loss is {loss} (no alignment has non-zero probability)"
    if tdt:  # each TDT arc adds two rounded log-probs (token and duration)
        from .tdt_lattice import negative_loss_tolerance as tdt_tolerance

        tol = tdt_tolerance(T, U, float64, input_eps)
    else:
        tol = negative_loss_tolerance(T, U, float64, input_eps)
    if loss < -tol:
        return (f"loss is {loss:.6g}, below 0 beyond rounding (tolerance {tol:.2g} nats), which "
                "-log P(y|x) cannot be: are its log-probs normalised? (rnntool inspect checks)")
    return None


def utterance_problem(reader: DumpReader, info: UttInfo, loss: float,
                      float64: bool | None = None) -> str | None:
    """``loss_problem`` of one utterance of ``reader``: its lengths, and the rounding its
    stored values carry (``input_eps``). ``float64``: whether ``loss`` was computed in
    float64 (default: when the logits are float64, as the engine does)."""
    if float64 is None:
        float64 = info.dtype == np.float64
    return loss_problem(loss, info.T, info.U, float64, input_eps(reader, info.dtype),
                        tdt=reader.model_kind == "tdt")


def _row(reader: DumpReader, info: UttInfo, loss: float) -> dict:
    row = {
        "utt_id": info.utt_id,
        "T": info.T,
        "U": info.U,
        "loss": loss,
        "loss_per_frame": loss / info.T,
        "loss_per_token": loss / max(info.U, 1),
        "_problem": utterance_problem(reader, info, loss),
    }
    if "loss" in info.attrs:
        stored = float(info.attrs["loss"])
        row["stored_loss"] = stored
        row["loss_diff"] = loss - stored
    return row


class _quiet_nonfinite:
    """The rows report impossible losses themselves (``_problem``, by utterance id, not by
    batch index): the engine's ``ImpossibleLossWarning``s are dropped; and torch's note
    that mapped file pages are read-only is expected here."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("ignore", category=ImpossibleLossWarning)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def summarize(rows: Sequence[dict], worst: int = 5) -> dict:
    """count, finite count, mean and total loss, and the ``worst`` highest-loss utterances;
    with ``T`` and ``U`` in the rows also ``frames`` (sum of T) and ``tokens`` (sum of
    max(U, 1), as the ``mean_tokens`` reduction counts) of the finite ones, and
    ``per_frame``, ``per_token``: the total loss over those sums.

    Every figure is a sum over all rows, or a ratio of two such sums (never a mean of
    means), summed in the order given: the rows of a run merged from parts, in
    single-process order, give the same bits as one process."""
    finite = [r for r in rows if math.isfinite(r["loss"])]
    total = sum(r["loss"] for r in finite)
    frames = sum(r.get("T", 0) for r in finite)
    tokens = sum(max(r.get("U", 0), 1) for r in finite)
    return {
        "count": len(rows),
        "finite": len(finite),
        "total": total,
        "mean": total / len(finite) if finite else math.nan,
        "frames": frames,
        "tokens": tokens,
        "per_frame": total / frames if finite and frames else math.nan,
        "per_token": total / tokens if finite else math.nan,
        "worst": sorted(finite, key=lambda r: -r["loss"])[:worst],
        "nonfinite": [r["utt_id"] for r in rows if not math.isfinite(r["loss"])],
    }
