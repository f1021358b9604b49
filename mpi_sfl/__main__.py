"""python -m mpi_sfl train|baseline ... (see mpi_sfl.cli)."""
from .cli import exit_now, main

main()
exit_now()
