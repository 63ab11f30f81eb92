"""The cases of ``ppokernels/bench/suite/bench_rl.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_rl import *  # noqa: F403
