"""The cases of ``ppokernels/bench/suite/bench_kl_penalty.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_kl_penalty import *  # noqa: F403
