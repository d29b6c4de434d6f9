"""Benchmarks: ``python -m bench`` prints the comparison table (see ``bench/RESULTS.md``);
``pytest bench/ --benchmark-only`` times the backends' ops. Benchmarks are not tests: the
normal test run (``python -m pytest``, ``testpaths = ["tests"]``) does not collect them."""
