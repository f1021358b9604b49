"""mpi_sfl: Split Federated Learning (SplitFed) over MPI ranks with mpi4py and torch."""
__version__ = "0.1.0"
