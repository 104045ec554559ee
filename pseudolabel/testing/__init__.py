"""Test support shipped with the package: stand-in models, synthetic data and local dev servers.

Used by the test suite, the benchmarks and ``pseudolabel demo`` only. The pipeline (``pseudolabel``'s
other packages, ``resources``, ``assets``) never imports it; ``tests/test_layering.py`` checks that.
The one indirect use is the ``fake`` model backend, which the model loader resolves by name.
"""
