"""A first look at the loss engine: the public fixed case, then a padded batch.

Run by `make demo`. Prints per-utterance losses (nats) from the CPU backend,
from the CUDA kernels (Numba's simulator when there is no GPU), and from the
float64 reference, side by side.
"""

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0" if os.path.exists("/dev/nvidia0") else "1")

import torch  # noqa: E402

import rnntool  # noqa: E402
from rnntool.reference import reference_rnnt_loss  # noqa: E402


def main() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, U, V = 4, 12, 5, 10
    logits = torch.randn(B, T, U + 1, V, generator=g) * 2
    targets = torch.randint(1, V, (B, U), generator=g)
    t_len = torch.tensor([12, 9, 5, 12])
    u_len = torch.tensor([5, 3, 2, 0])
    cuda_dev = "cuda" if torch.cuda.is_available() and os.environ["NUMBA_ENABLE_CUDASIM"] == "0" \
        else "cpu"
    with torch.no_grad():
        cpu = rnntool.rnnt_loss(logits, targets, t_len, u_len, reduction="none")
        gpu = rnntool.rnnt_loss(logits.to(cuda_dev), targets.to(cuda_dev), t_len.to(cuda_dev),
                                u_len.to(cuda_dev), reduction="none", backend="cuda").cpu()
    ref = reference_rnnt_loss(logits.double(), targets, t_len, u_len)
    label = "cuda" if cuda_dev == "cuda" else "cuda-sim"
    print(f"utt\tT\tU\tloss_cpu\tloss_{label}\tloss_reference")
    for b in range(B):
        print(f"{b}\t{int(t_len[b])}\t{int(u_len[b])}\t{cpu[b]:.6f}\t{gpu[b]:.6f}\t{ref[b]:.6f}")


if __name__ == "__main__":
    main()
