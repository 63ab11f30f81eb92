"""The benchmark suite, installed with the package: ``ppokernels bench`` (``cli``), the cases
(``suite/bench_<stem>.py``, pytest-benchmark), their pytest plugin (``plugin``), timing and memory
helpers (``_common``), the competition's functions (``peers``) and the report (``report``).

Needs the ``[bench]`` extra (pytest, pytest-benchmark, matplotlib); the core install does not.
"""

from ppokernels.bench.cli import add_parser, main

__all__ = ["add_parser", "main"]
