"""mpi_sfl: Split Federated Learning (SplitFed) over MPI ranks with mpi4py and torch."""
import os

__version__ = "0.1.0"

# Large torch CPU tensors (activations, gradients) on transparent huge pages: MPI moves them about
# twice as fast at 16 MiB on these machines. Read by torch at its first large allocation, so it
# must be set before then; a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
