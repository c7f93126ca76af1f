"""Benchmarks: usersync measured against its own limits, every target a ratio from one run.

``python -m bench`` (``make bench``) writes ``bench/results.json``, ``bench/results.md`` and
``bench/results.png``; ``--quick`` scales every size down, ``--tiny`` is the test suite's smoke run.
Each measurement runs in a fresh subprocess (:mod:`bench.phase`) so its peak RSS is its own.
"""
