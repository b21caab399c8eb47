"""Run one kernel call forward+backward and print its peak RSS beyond the inputs, in bytes.

A fresh process per measurement (``python tests/peak_rss_probe.py BACKEND N H V``) so that the
high-water mark belongs to that call alone.
"""

import resource
import sys

import torch

from gem_fast.kernels import fused_logprob_entropy


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    backend, n, h, v = sys.argv[1], *map(int, sys.argv[2:5])
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,))
    # Gradients are outputs every backend must produce: allocate them before the baseline.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    baseline = current_rss()
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - baseline)


if __name__ == "__main__":
    main()
