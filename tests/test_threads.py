"""The CPU kernels under fork, spawn and concurrent Python threads, on every threading layer.

Each case runs in a fresh interpreter (the layer is chosen once per process),
bounded by a timeout; the child compares its results bitwise with a serial run
in its own process and reports one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
POOL_TIMEOUT = 60  # seconds for a pool's results; spawned workers import torch
RUN_TIMEOUT = 150  # seconds for a whole child
UNAVAILABLE = 3  # the child's exit code when the requested layer cannot load

CHILD = textwrap.dedent(
    """
    import json, multiprocessing, sys, threading, traceback
    sys.path.insert(0, {tests!r})
    if "--hide-tbb" in sys.argv:
        # As on a machine without the tbb package: rnntool cannot find the library.
        from importlib import metadata
        _dist = metadata.distribution
        def _no_tbb(name):
            if name == "tbb":
                raise metadata.PackageNotFoundError(name)
            return _dist(name)
        metadata.distribution = _no_tbb

    import numba
    import torch
    from helpers import random_batch
    from rnntool import rnnt_loss
    from rnntool.threads import kernel_lock

    def layer_or_exit():
        try:
            compute(0)  # the first launch starts the layer
        except ValueError as e:
            if "threading layer" not in str(e):
                raise
            print("layer unavailable:", e)
            sys.exit({unavailable})
        return numba.threading_layer()

    def compute(seed):
        # Loss and gradient of one small batch, as raw bytes for a bitwise comparison.
        x, y, tl, ul = random_batch(3, 7, 4, 6, seed=seed)
        x.requires_grad_()
        loss = rnnt_loss(x, y, tl, ul, blank=0, reduction="none")
        (loss * torch.arange(1.0, 4.0)).sum().backward()
        return loss.detach().numpy().tobytes(), x.grad.numpy().tobytes()

    SEEDS = list(range(8))

    def report(layer, ok, error=""):
        print(json.dumps(dict(layer=layer, ok=ok, error=error)), flush=True)
        sys.exit(0 if ok else 1)

    def run_threads(layer):
        serial = [compute(s) for s in SEEDS]
        with kernel_lock():
            with kernel_lock():  # nested use in one thread must not deadlock
                pass
        n_threads, rounds = 4, 20
        results, errors = dict(), []
        barrier = threading.Barrier(n_threads)

        def worker(k):
            try:
                barrier.wait()
                for r in range(rounds):
                    s = SEEDS[(k + r) % len(SEEDS)]
                    results[(k, r)] = (s, compute(s))
            except BaseException:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout={pool_timeout})
        if any(t.is_alive() for t in threads):
            report(layer, False, "threads did not finish")
        if errors:
            report(layer, False, errors[0])
        bad = [key for key, (s, got) in results.items() if got != serial[s]]
        if len(results) != n_threads * rounds or bad:
            report(layer, False, f"{{len(bad)}} results differ from the serial run: {{bad[:5]}}")
        report(layer, True)

    def run_pool(layer, method):
        parent = [compute(s) for s in SEEDS]  # use the kernels before forking
        ctx = multiprocessing.get_context(method)
        try:
            with ctx.Pool(2) as pool:
                workers = pool.map_async(compute, SEEDS).get(timeout={pool_timeout})
        except multiprocessing.TimeoutError:
            report(layer, False, "TimeoutError: the pool's workers never returned")
        except Exception as e:
            report(layer, False, f"{{type(e).__name__}}: {{e}}")
        bad = [s for s, a, b in zip(SEEDS, parent, workers) if a != b]
        if bad:
            report(layer, False, f"workers differ from the parent for seeds {{bad}}")
        report(layer, True)

    if __name__ == "__main__":
        layer = layer_or_exit()
        mode = sys.argv[1]
        if mode == "threads":
            run_threads(layer)
        else:
            run_pool(layer, mode)
    """
).format(tests=str(TESTS), unavailable=UNAVAILABLE, pool_timeout=POOL_TIMEOUT)


def _run_child(tmp_path, mode, layer=None, *extra):
    """Run CHILD in ``mode``; return (its JSON report, its output for messages)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, *extra], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and any pool workers it left
        out, err = proc.communicate()
        pytest.fail(f"child ({mode}, layer={layer}) ran past {RUN_TIMEOUT} s\n{out}\n{err[-3000:]}")
    shown = f"child ({mode}, layer={layer}) exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"Numba's {layer!r} threading layer cannot load here: {out.strip()}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, shown
    return json.loads(lines[-1]), shown


def _has_tbb_package():
    from importlib import metadata

    try:
        metadata.distribution("tbb")
    except metadata.PackageNotFoundError:
        return False
    return True


# ----------------------------------------------------------------- the default layer
def test_default_layer_is_fork_and_thread_safe(tmp_path):
    report, shown = _run_child(tmp_path, "threads")
    assert report["ok"], shown
    # Never GNU OpenMP unless asked for: tbb where the package is, else workqueue (+ lock).
    assert report["layer"] == ("tbb" if _has_tbb_package() else "workqueue"), shown


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_after_use_matches_parent(tmp_path, method):
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"no {method!r} start method on this platform")
    report, shown = _run_child(tmp_path, method)
    assert report["ok"], shown


def test_without_tbb_falls_back_to_a_safe_layer(tmp_path):
    report, shown = _run_child(tmp_path, "threads", None, "--hide-tbb")
    assert report["ok"], shown
    assert report["layer"] != "omp", shown
    report, shown = _run_child(tmp_path, "fork", None, "--hide-tbb")
    assert report["ok"], shown


# ----------------------------------------------------------------- a layer the user chose
@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_threads_under_each_layer(tmp_path, layer):
    report, shown = _run_child(tmp_path, "threads", layer)
    assert report["layer"] == layer, shown  # the user's choice is respected
    assert report["ok"], shown


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_fork_under_each_layer(tmp_path, layer):
    report, shown = _run_child(tmp_path, "fork", layer)
    assert report["layer"] == layer, shown
    if layer == "omp" and not report["ok"]:
        # GNU OpenMP cannot run in a forked child: a clear error, not a dead or hung worker.
        assert report["error"].startswith("RuntimeError"), shown
        assert "GNU OpenMP" in report["error"] and "spawn" in report["error"], shown
    else:
        assert report["ok"], shown
