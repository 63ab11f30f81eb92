"""The cases of ``ppokernels/bench/suite/bench_token_logprobs.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_token_logprobs import *  # noqa: F403
