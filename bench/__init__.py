"""cloudckpt's benchmarks: ``python -m bench [--quick]`` from the repository root (see ``bench/__main__.py``).

Scenarios (one module each): ``step_overhead`` (1), ``stall`` (2), ``throughput`` (3 upload, 4 restore),
``memory`` (5), ``integrity`` (6). Every figure is measured next to its baseline in the same run and
reported as a median with its spread; results go to ``bench/results.json``.
"""
