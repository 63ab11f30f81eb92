"""The cases of ``ppokernels/bench/suite/bench_ppo_policy_loss_modes.py`` (installed with the
package, run by ``ppokernels bench``), exposed to ``pytest benchmarks`` in a checkout."""

from ppokernels.bench.suite.bench_ppo_policy_loss_modes import *  # noqa: F403
