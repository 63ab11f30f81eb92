"""pytest-benchmark cases, one module per op family (``bench_<stem>.py``); run them with
``ppokernels bench`` or, in a checkout, ``pytest benchmarks`` (thin files that re-export these)."""
