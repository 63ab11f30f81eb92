"""The cases of ``ppokernels/bench/suite/bench_per_call.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_per_call import *  # noqa: F403
