"""Suite-wide settings."""

import torch

# One intra-op thread: on a shared 2-core machine, OpenMP threads spin-waiting for each other make
# the tiny convolutions of these tests several times slower, and single-threaded is no slower alone.
torch.set_num_threads(1)
