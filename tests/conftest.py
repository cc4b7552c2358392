"""Test-session settings (tests only; the library itself sets nothing at import).

The tests use tiny tensors, for which torch's intra-op threads cost more than they save, and several tests
spawn worker processes (DDP with gloo, fresh-process memory measurements) that would otherwise
oversubscribe the 2-core CI machine. One thread per process keeps the suite fast and its timings stable.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by worker processes

import torch  # noqa: E402

torch.set_num_threads(1)
