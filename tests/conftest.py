"""Suite-wide settings."""

import os

# Threads that find the other core busy should sleep rather than spin (set before torch starts
# OpenMP); tests that time two threads would otherwise take minutes on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# One intra-op thread: on a shared 2-core machine, OpenMP threads spin-waiting for each other make
# the tiny convolutions of these tests several times slower, and single-threaded is no slower alone.
torch.set_num_threads(1)
