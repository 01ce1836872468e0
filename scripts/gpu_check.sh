#!/usr/bin/env bash
# One-shot check of the CUDA backend on a machine with a real GPU.
#
#   make gpu-wheels                  # here, once: pytest, hypothesis, warprnnt_numba wheels into .whl/
#   bash scripts/gpu_check.sh        # there, from the checkout root (carry .whl)
#
# Runs the `cuda`-marked tests, compares CUDA with CPU on random batches (loss,
# gradient, and align's Viterbi paths and posteriors),
# and benchmarks rnntool against torchaudio's CUDA rnnt_loss and warprnnt_numba
# at B32 T400 U100 V1024 and B16 T1000 U300 V128 in float32 (DTYPES: also float16).
# Everything it prints is also written to $OUT/gpu_check.log when OUT is set.
# The `tdt` step compares the TDT loss's CUDA kernels with the CPU's (all dtypes) and
# the TDT Viterbi paths and posteriors (tdt_align) and a TDT dump's scores likewise,
# times it against rnnt_loss (benchmarks/bench_tdt.py), and compares it with NeMo's
# TDT loss where NeMo imports (it is not installed on the GPU machine: skipped).
# The default run fits the device's 600 s per-command limit: worst case about 550 s
# (every step at its timeout: tests 110 + compare 110 + tdt 2 x 80 + bench 150, plus
# about 20 s of setup), the benchmark in float32 only; DTYPES="float32 float16"
# adds 150 s (run that with STEPS=bench). A subset: STEPS="tests compare", STEPS=tdt.
# QUICK=1 (little device time left): shorter timeouts, one shape only, worst case
# about 330 s (80 + 70 + 2 x 50 + 60, plus setup).
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$log") 2>&1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# numba-cuda 0.30 calls np.row_stack, which numpy 2.5 removed (seen on the H200 machine):
# give it the alias it expects, for this check only.
mkdir -p /tmp/site && cat > /tmp/site/sitecustomize.py <<'SITE'
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
SITE
export PYTHONPATH=$PYTHONPATH:/tmp/site
QUICK=${QUICK:-0}
t_tests=110; t_cmp=110; t_bench=150; t_tdt=80; dtypes=${DTYPES:-float32}
shapes="32,400,100,1024 16,1000,300,128"
if [ "$QUICK" = 1 ]; then
  t_tests=80; t_cmp=70; t_bench=60; t_tdt=50; dtypes=float32; shapes=32,400,100,1024
fi
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__)"

STEPS=${STEPS:-tests compare bench tdt}  # a subset reruns what failed
case " $STEPS " in *" tests "*)
echo "== cuda-marked tests"
timeout $t_tests python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider || echo "TESTS FAILED"
;; esac

case " $STEPS " in *" compare "*)
echo "== CUDA vs CPU on random batches"
timeout $t_cmp python3 - <<'PY' || echo "COMPARE FAILED"
import torch, rnntool
torch.manual_seed(0)
for B, T, U, V, dt in [(4, 50, 20, 40, torch.float32), (3, 33, 17, 129, torch.float16),
                       (2, 20, 9, 64, torch.bfloat16), (5, 16, 7, 30, torch.float64)]:
    x = torch.randn(B, T, U + 1, V).to(dt)
    y = torch.randint(1, V, (B, U))
    Tl = torch.randint(1, T + 1, (B,)); Ul = torch.randint(0, U + 1, (B,)); Tl[0], Ul[0] = T, U
    res = {}
    for dev in ("cpu", "cuda"):
        xx = x.detach().to(dev).requires_grad_()  # a leaf on each device
        l = rnntool.rnnt_loss(xx, y.to(dev), Tl.to(dev), Ul.to(dev), blank=0, reduction="none",
                              clamp=0.5, fastemit_lambda=0.01)
        l.sum().backward()
        res[dev] = (l.detach().cpu().double(), xx.grad.cpu().double())
    dl = (res["cpu"][0] - res["cuda"][0]).abs().max().item()
    dg = (res["cpu"][1] - res["cuda"][1]).abs().max().item()
    print(f"B{B} T{T} U{U} V{V} {dt}: max |loss diff| {dl:.3g}  max |grad diff| {dg:.3g}")
# align: Viterbi frames and posteriors, CUDA against CPU
x = torch.randn(6, 120, 31, 64) * 3
y = torch.randint(1, 64, (6, 30)); Tl = torch.full((6,), 120); Ul = torch.full((6,), 30)
cpu = rnntool.align(x, y, Tl, Ul, backend="cpu")
gpu = rnntool.align(x.cuda(), y.cuda(), Tl.cuda(), Ul.cuda(), backend="cuda")
same = sum(a.frames.tolist() == b.frames.tolist() for a, b in zip(cpu, gpu))
dbest = max(abs(a.best_log_prob - b.best_log_prob) for a, b in zip(cpu, gpu))
docc = max(float(abs(a.occupancy - b.occupancy).max()) for a, b in zip(cpu, gpu))
print(f"align: {same}/6 identical Viterbi paths, max |best log P diff| {dbest:.3g}, "
      f"max |occupancy diff| {docc:.3g}")
# lattice dumps: stage 1's three arrays on CUDA against the CPU, a lattice dump written from
# CUDA logits scoring to the bits of the CUDA loss, and the lattice writer's time on the GPU
import tempfile, time
import numpy as np
from rnntool.engine import LossOptions, load_engine
from rnntool.reader import DumpReader
from rnntool.score import score_rows
opts = LossOptions(blank=0)
tc = load_engine("cpu").lattice_terms(x, y, Tl, Ul, opts)
tg = load_engine("cuda").lattice_terms(x.cuda(), y.cuda(), Tl.cuda(), Ul.cuda(), opts)
for name in ("blank_lp", "emit_lp", "log_p2_others"):
    a, b = getattr(tc, name), getattr(tg, name).cpu().numpy()
    fin = np.isfinite(a)  # (-inf where there is no arc: the same on both)
    print(f"lattice_terms {name}: max |CUDA - CPU| {float(abs(a[fin] - b[fin]).max()):.3g}, "
          f"same -inf entries: {bool((np.isneginf(a) == np.isneginf(b)).all())}")
xb = (torch.randn(16, 200, 61, 1024, device="cuda") * 3).half()
yb = torch.randint(1, 1024, (16, 60), device="cuda")
Tb, Ub = torch.full((16,), 200), torch.full((16,), 60)
with tempfile.TemporaryDirectory() as d:
    for rep in range(3):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with rnntool.DumpWriter(f"{d}/lat.h5", blank=0, kind="lattice") as w:
            w.add_batch(xb, yb, Tb, Ub)
        dt = time.perf_counter() - t0
    want = rnntool.rnnt_loss(xb, yb, Tb.cuda(), Ub.cuda(), blank=0, reduction="none").cpu()
    with DumpReader(f"{d}/lat.h5") as r:
        by_id = {row["utt_id"]: row["loss"] for row in score_rows([(r, r.utt_ids)])}
    got = torch.tensor([by_id[str(b)] for b in range(16)])
    print(f"lattice writer on CUDA, B16 T200 U60 V1024 float16: {dt * 1e3:.0f} ms; scores equal "
          f"the CUDA loss bit for bit: {bool((got == want.float()).all())}")
PY
;; esac

case " $STEPS " in *" tdt "*)
echo "== TDT: CUDA vs CPU, timing, NeMo"
timeout $t_tdt python3 - <<'PY' || echo "TDT COMPARE FAILED"
import sys, torch, rnntool
torch.manual_seed(0)
durs = [0, 1, 2, 3, 4]
failed = []
def expect(ok, what):  # a mismatch fails the step (exit 1), not just a printed number
    if not ok:
        failed.append(what)
        print(f"MISMATCH: {what}")
# the same input bits on both backends; lattice terms in float32 (float64 for float64
# input), alpha/beta in float64; 16-bit gradients are stored in 16 bits
loss_rtol = {torch.float64: 1e-10}
grad_atol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}
for B, T, U, V, dt in [(4, 50, 20, 40, torch.float32), (3, 33, 300, 129, torch.float16),
                       (2, 20, 9, 64, torch.bfloat16), (5, 16, 7, 30, torch.float64)]:
    x = torch.randn(B, T, U + 1, V + len(durs)).to(dt)
    y = torch.randint(1, V, (B, U))
    Tl = torch.randint(1, T + 1, (B,)); Ul = torch.randint(0, U + 1, (B,)); Tl[0], Ul[0] = T, U
    res = {}
    for dev in ("cpu", "cuda"):
        xx = x.detach().to(dev).requires_grad_()
        l = rnntool.tdt_loss(xx, y.to(dev), Tl.to(dev), Ul.to(dev), durations=durs, blank=0,
                             sigma=0.05, reduction="none", clamp=0.5, fastemit_lambda=0.01)
        l.sum().backward()
        res[dev] = (l.detach().cpu().double(), xx.grad.cpu().double())
    dl = (res["cpu"][0] - res["cuda"][0]).abs().max().item()
    dg = (res["cpu"][1] - res["cuda"][1]).abs().max().item()
    print(f"TDT B{B} T{T} U{U} V{V} D5 {dt}: max |loss diff| {dl:.3g}  max |grad diff| {dg:.3g}")
    scale = max(1.0, res["cpu"][0].abs().max().item())
    expect(dl <= loss_rtol.get(dt, 1e-5) * scale, f"TDT {dt} loss: CUDA vs CPU {dl:.3g}")
    expect(dg <= grad_atol[dt], f"TDT {dt} gradient: CUDA vs CPU {dg:.3g}")
# TDT alignments (Viterbi arcs, posteriors) and a TDT dump's scores, CUDA against CPU
import tempfile
from rnntool.align import tdt_align
from rnntool.reader import DumpReader
from rnntool.score import score_rows
x = torch.randn(6, 120, 31, 64 + len(durs)) * 3
y = torch.randint(1, 64, (6, 30)); Tl = torch.full((6,), 120); Ul = torch.full((6,), 30)
cpu = tdt_align(x, y, Tl, Ul, durations=durs, blank=0, backend="cpu")
gpu = tdt_align(x.cuda(), y.cuda(), Tl.cuda(), Ul.cuda(), durations=durs, blank=0, backend="cuda")
same = sum(a.arcs.tolist() == b.arcs.tolist() for a, b in zip(cpu, gpu))
dbest = max(abs(a.best_log_prob - b.best_log_prob) for a, b in zip(cpu, gpu))
docc = max(float(abs(a.occupancy - b.occupancy).max()) for a, b in zip(cpu, gpu))
print(f"tdt_align: {same}/6 identical Viterbi paths, max |best log P diff| {dbest:.3g}, "
      f"max |occupancy diff| {docc:.3g}")
expect(same == 6, f"tdt_align: {same}/6 identical Viterbi paths")
expect(dbest <= 1e-3 and docc <= 1e-4, f"tdt_align: best log P {dbest:.3g}, occupancy {docc:.3g}")
with tempfile.TemporaryDirectory() as d:
    with rnntool.DumpWriter(f"{d}/tdt.h5", blank=0, model_kind="tdt", durations=durs) as w:
        w.add_batch(x, y, Tl, Ul)
    with DumpReader(f"{d}/tdt.h5") as r:
        sc = {row["utt_id"]: row["loss"] for row in score_rows([(r, r.utt_ids)], backend="cpu")}
        sg = {row["utt_id"]: row["loss"] for row in score_rows([(r, r.utt_ids)], backend="cuda")}
    dscore = max(abs(sc[k] - sg[k]) / max(1.0, abs(sc[k])) for k in sc)
    print(f"TDT dump scores: max relative |CUDA - CPU| {dscore:.3g}")
    expect(dscore <= 1e-5, f"TDT dump scores: CUDA vs CPU {dscore:.3g}")
try:  # NeMo's numba TDT loss, where NeMo imports (not on the GPU machine so far)
    from nemo.collections.asr.parts.numba.rnnt_loss.rnnt_pytorch import TDTLossNumba
except Exception as e:  # noqa: BLE001
    print(f"NeMo not importable ({type(e).__name__}): NeMo TDT comparison skipped")
else:
    try:
        V = 129
        x = torch.randn(4, 60, 21, V + len(durs), device="cuda")
        y = torch.randint(0, V - 1, (4, 20), device="cuda")
        Tl = torch.full((4,), 60, device="cuda"); Ul = torch.full((4,), 20, device="cuda")
        ours = rnntool.tdt_loss(x, y, Tl, Ul, durations=durs, blank=V - 1, sigma=0.05,
                                reduction="sum")
        nemo = TDTLossNumba(blank=V - 1, durations=durs, reduction="sum", sigma=0.05)
        theirs = nemo(x, y, Tl, Ul)  # NeMo's layout too: V tokens (blank last), then D
        print(f"NeMo TDT (sum, sigma 0.05): rnntool {float(ours):.6f}  NeMo {float(theirs):.6f}")
        expect(abs(float(ours) - float(theirs)) <= 1e-4 * max(1.0, abs(float(theirs))),
               "NeMo TDT loss differs")
    except Exception as e:  # noqa: BLE001
        print(f"NeMo TDT comparison failed to run: {type(e).__name__}: {e}")
sys.exit(1 if failed else 0)
PY
timeout $t_tdt python3 benchmarks/bench_tdt.py --device cuda --repeats 10 \
  --shapes 8,150,40,512 32,400,100,1024 || echo "TDT BENCH FAILED"
;; esac

case " $STEPS " in *" bench "*) ;; *) dtypes="" ;; esac
for dtype in $dtypes; do
  echo "== benchmark $dtype"
  timeout $t_bench python3 benchmarks/bench_loss.py --device cuda --dtype $dtype --repeats 10 \
    --shapes $shapes || echo "BENCH FAILED ($dtype)"
done
