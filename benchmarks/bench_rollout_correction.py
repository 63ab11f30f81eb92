"""The cases of ``ppokernels/bench/suite/bench_rollout_correction.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_rollout_correction import *  # noqa: F403
