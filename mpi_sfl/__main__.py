"""python -m mpi_sfl train|baseline ... (see mpi_sfl.cli)."""
from .cli import exit_now, main

main(quick_exit=True)
exit_now()
