"""Run by test_failures under torchrun: failure_cases.job_frozen on every rank (argv[1]: the
folder the ranks write to)."""

import sys

import failure_cases as fc
import torch

if __name__ == "__main__":
    torch.set_num_threads(1)
    fc.job_frozen(sys.argv[1])
