"""mpi_sfl's benchmark suites: `python -m benchmarks SUITE [--quick | --tiny]` from the repository root.

The driver is benchmarks.cli (suite registry and command line), one module per suite (wire,
aggregate, throughput, memory, scaling, model), shared plumbing in benchmarks.common, and the MPI
workers the suites launch as `-m benchmarks._NAME`. Nothing is imported here: a worker pays only
for what it uses.
"""
