"""Developer scripts (not part of the installed package): ``tools.data`` builds the data and reference models,
``tools.bench`` measures (every figure in docs/BENCHMARKS.md, with its command), ``tools.paper`` reproduces the
paper's experiment."""
