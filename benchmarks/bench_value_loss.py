"""The cases of ``ppokernels/bench/suite/bench_value_loss.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_value_loss import *  # noqa: F403
