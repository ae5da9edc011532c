# The benchmarks in bench/ are run on purpose (`pytest bench/`), never as part of the unit tests.
