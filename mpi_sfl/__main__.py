"""python -m mpi_sfl train|baseline ... (see mpi_sfl.cli)."""
from .cli import main

main()
