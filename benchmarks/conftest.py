"""``pytest benchmarks`` in a checkout: the suite's plugin, as ``ppokernels bench`` loads it
(presets; parametrisation by shape, provider and device; see ``ppokernels/bench/plugin.py``)."""

from ppokernels.bench.plugin import *  # noqa: F403
