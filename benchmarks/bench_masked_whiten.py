"""The cases of ``ppokernels/bench/suite/bench_masked_whiten.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_masked_whiten import *  # noqa: F403
