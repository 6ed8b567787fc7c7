"""cloudckpt's benchmarks: ``python -m bench [--quick]`` from the repository root (see ``bench/__main__.py``).

Scenarios (one module each): ``step_overhead`` (1), ``stall`` (2), ``throughput`` (3 upload, 4 restore),
``memory`` (5), ``integrity`` (6), ``tf2_async`` (7), ``background_step``, ``deadline`` (8),
``incremental`` (10), and ``throughput`` again with the client on a core shared with a busy training
stand-in (11 ``upload_contended``, 12 ``restore_contended``). Every figure is measured next to its baseline in the same run and
reported as a median with its spread; results go to ``bench/results.json``.
"""
