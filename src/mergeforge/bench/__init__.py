"""Benchmark harness: model pools (``pool.py`` contract; ``pools.py``, ``user_pools.py``,
``llm_pool.py``, ``clip_pool.py``), evaluation, hyperparameter grids, the runner and its executors,
``results.json`` records, the leaderboard and the HTML report (``mergeforge bench``)."""
