"""Float32 accuracy on long lattices: rnntool and torchaudio against rnntool's float64.

Per case (random logits, T 1000-2000 frames, U 100-400 labels), prints the
relative error of the float32 loss, and of the float32 gradient on the entries
where the float64 gradient is large (|g| > 0.1, as peers' suites test): the
median, the 99th percentile and the worst, over the whole lattice and over its
first 10 frames (where a global log P normaliser drifts most). The truth is
rnntool on float64 logits, itself checked against the float64 reference in the
test suite.

    python benchmarks/bench_precision.py                 # the default cases
    python benchmarks/bench_precision.py --cases 1600,354,50 2000,400,40

Not a test: a measurement to quote (the README's precision figures come from here).
"""

from __future__ import annotations

import argparse

import torch

DEFAULT_CASES = ["1000,100,37", "1600,353,50", "2000,400,65", "1500,250,40"]


def rnntool_grad(x, y, T, U):
    import rnntool

    x = x.detach().clone().requires_grad_(True)
    loss = rnntool.rnnt_loss(x, y, T, U, blank=0, reduction="none")
    loss.sum().backward()
    return loss.detach().double(), x.grad.double()


def torchaudio_grad(x, y, T, U):
    import torchaudio.functional as taf

    x = x.detach().clone().requires_grad_(True)
    loss = taf.rnnt_loss(x, y.int(), T.int(), U.int(), blank=0, reduction="none")
    loss.sum().backward()
    return loss.detach().double(), x.grad.double()


def errors(loss, grad, loss64, grad64, frames=10):
    """(loss rel err, grad median / p99 / max rel err, first-frames median / max rel err)."""
    big = grad64.abs() > 0.1
    rel = ((grad - grad64).abs() / grad64.abs())
    head = rel[:, :frames][big[:, :frames]]
    rel = rel[big]
    return (
        float(((loss - loss64).abs() / loss64.abs()).max()),
        float(rel.median()), float(torch.quantile(rel, 0.99)), float(rel.max()),
        float(head.median()), float(head.max()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="T,U,V per case (B = 2)")
    ap.add_argument("--seed", type=int, default=20211224)
    args = ap.parse_args()
    tools = {"rnntool": rnntool_grad}
    try:
        import torchaudio.functional  # noqa: F401

        tools["torchaudio"] = torchaudio_grad
    except Exception as e:  # noqa: BLE001 (absent: say so and go on)
        print(f"torchaudio: not available ({type(e).__name__})")
    torch.manual_seed(args.seed)
    head = (f"{'case (B=2)':>22} {'tool':>11} {'loss rel':>9} {'grad med':>9} {'grad p99':>9} "
            f"{'grad max':>9} {'t<10 med':>9} {'t<10 max':>9}")
    print(head)
    for case in args.cases:
        T, U, V = (int(v) for v in case.split(","))
        # Like peers' long random cases: uniform logits, the second utterance shorter.
        x64 = torch.rand(2, T, U + 1, V, dtype=torch.float64)
        y = torch.randint(1, V, (2, U))
        t_len = torch.tensor([T, T - T // 7])
        u_len = torch.tensor([U, U - U // 5])
        loss64, grad64 = rnntool_grad(x64, y, t_len, u_len)
        for name, fn in tools.items():
            loss, grad = fn(x64.float(), y, t_len, u_len)
            e = errors(loss, grad, loss64, grad64)
            print(f"{f'T={T} U={U} V={V}':>22} {name:>11} " + " ".join(f"{v:9.1e}" for v in e),
                  flush=True)


if __name__ == "__main__":
    main()
