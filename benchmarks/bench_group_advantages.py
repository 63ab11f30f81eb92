"""The cases of ``ppokernels/bench/suite/bench_group_advantages.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_group_advantages import *  # noqa: F403
