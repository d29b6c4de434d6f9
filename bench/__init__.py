"""Benchmarks: ``python -m bench`` prints the comparison table (see ``bench/RESULTS.md``);
``python -m bench.<primitive>`` times one primitive of the backends (``affine_relevance``,
``affine_relevance_l1``) on real layers' shapes. Benchmarks are not tests: the
normal test run (``python -m pytest``, ``testpaths = ["tests"]``) does not collect them."""
