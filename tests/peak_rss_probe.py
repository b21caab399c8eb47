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


def peak_rss() -> int:
    # VmHWM belongs to this process's own address space. getrusage's ru_maxrss does not: Linux
    # carries the parent's high-water mark across fork/vfork + exec, so a probe started from a
    # large pytest process would report the parent's size.
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


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
    print(peak_rss() - baseline)


if __name__ == "__main__":
    main()
