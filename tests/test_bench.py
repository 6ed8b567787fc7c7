"""The benchmark code itself runs (``python -m bench --tiny``) and writes a complete results.json.

No timing is asserted: on a shared 2-core machine only ratios measured in the
same run mean anything, and the tiny sizes make even those meaningless. What is
checked is that every scenario ran its method and its baselines, with the
repetitions asked for, and that the figures and ratios are consistent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = {
    "step_overhead": ({"stock", "cloudckpt"}, {"cloudckpt/stock"}),
    "stall": ({"stock_local", "stock_sync_upload", "cloudckpt"},
              {"cloudckpt/stock_local", "cloudckpt/stock_sync_upload"}),
    "upload": ({"cloudckpt", "transfer_manager", "fs_put", "s5cmd", "cpu_cloudckpt", "cpu_transfer_manager",
                "server_cpu_cloudckpt", "server_cpu_transfer_manager"},
               {"cloudckpt/transfer_manager", "cloudckpt/fs_put", "cloudckpt/s5cmd", "cloudckpt/best_baseline",
                "cpu_cloudckpt/cpu_transfer_manager", "server_cpu_cloudckpt/server_cpu_transfer_manager"}),
    "restore": ({"cloudckpt", "transfer_manager", "fs_get", "s5cmd", "cpu_cloudckpt", "cpu_transfer_manager",
                 "server_cpu_cloudckpt", "server_cpu_transfer_manager"},
                {"cloudckpt/transfer_manager", "cloudckpt/fs_get", "cloudckpt/s5cmd", "cloudckpt/best_baseline",
                 "cpu_cloudckpt/cpu_transfer_manager", "server_cpu_cloudckpt/server_cpu_transfer_manager"}),
    "memory": ({"cloudckpt", "transfer_manager", "cloudckpt_restore", "transfer_manager_restore"},
               {"cloudckpt/transfer_manager", "cloudckpt/target_256MiB", "cloudckpt_restore/target_256MiB"}),
    "integrity": ({"crc_pass", "upload_with_crc", "upload_without_crc"},
                  {"crc_pass/upload", "upload_with_crc/upload_without_crc"}),
    "tf2_async": ({"no_save", "tf_local", "cloudckpt_sync", "cloudckpt_async"},
                  {"tf_local/no_save", "cloudckpt_sync/no_save", "cloudckpt_async/no_save",
                   "cloudckpt_async/cloudckpt_sync", "cloudckpt_sync/tf_local",
                   "cloudckpt_sync_save_step/tf_local_save_step"}),
    "background_step": ({"no_upload", "background_commit", "commit_mibps"}, {"background_commit/no_upload"}),
    "deadline": ({"largest_committed", "projected_in_deadline"}, set()),
    "incremental": ({"fine_tune_incremental", "fine_tune_full", "fine_tune_sent_fraction", "dense_incremental",
                     "dense_full", "fine_tune_cpu_incremental", "checksums_with_parts"},
                    {"fine_tune_incremental/fine_tune_full", "dense_incremental/dense_full",
                     "fine_tune_sent_fraction/checkpoint", "checksums_with_parts/checksums_whole_file"}),
}
# The same methods, the client on a core shared with a busy training stand-in (its core share: standin_*).
SCENARIOS.update({key: (SCENARIOS[base][0], SCENARIOS[base][1] | {"standin_cloudckpt/standin_transfer_manager"})
                  for key, base in (("upload_contended", "upload"), ("restore_contended", "restore"))})
# The transport scenarios run again on SeaweedFS (python -m bench runs both servers by default).
SCENARIOS.update({f"{key}@seaweedfs": SCENARIOS[key]
                  for key in ("upload", "restore", "memory", "deadline", "incremental", "upload_contended",
                              "restore_contended")})
REPS = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    env = dict(os.environ, CLOUDCKPT_CACHE_DIR=str(tmp / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--reps", str(REPS), "--out", str(out), "--workdir", str(tmp / "w"),
         "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"python -m bench --tiny failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f), proc.stdout


def _check_figure(name: str, fig: dict, n: int | None = None) -> None:
    for key in ("unit", "median", "min", "max", "q1", "q3", "n", "samples"):
        assert key in fig, f"{name}: no {key!r}"
    assert fig["min"] <= fig["q1"] <= fig["median"] <= fig["q3"] <= fig["max"], name
    assert len(fig["samples"]) == fig["n"], name
    assert min(fig["samples"]) == fig["min"] and max(fig["samples"]) == fig["max"], name
    if n is not None:
        assert fig["n"] == n, f"{name}: {fig['n']} samples, expected {n}"


def test_all_scenarios_with_figures_and_ratios(results: tuple[dict, str]) -> None:
    doc, _ = results
    assert list(doc["scenarios"]) == list(SCENARIOS)
    for key, (figures, ratios) in SCENARIOS.items():
        sc = doc["scenarios"][key]
        assert "error" not in sc, f"{key} failed:\n{sc.get('error')}"
        assert figures <= set(sc["figures"]), f"{key}: figures {sorted(sc['figures'])}"
        assert ratios <= set(sc["ratios"]), f"{key}: ratios {sorted(sc['ratios'])}"
        for name, fig in sc["figures"].items():
            _check_figure(f"{key}.{name}", fig)
        for name in figures:
            assert sc["figures"][name]["median"] > 0, f"{key}.{name} is not positive"
        for name, r in sc["ratios"].items():
            assert r["value"] > 0, f"{key}.{name}"
            assert r["met"] in (True, False, None), f"{key}.{name}"
            if r["target"]:
                op, bound = r["target"].split()
                assert r["met"] == (r["value"] <= float(bound) if op == "<=" else r["value"] >= float(bound))
        assert sc["seconds"] > 0


def test_ratios_are_computed_from_the_figures(results: tuple[dict, str]) -> None:
    doc, _ = results
    for key, (_figures, ratios) in SCENARIOS.items():
        sc = doc["scenarios"][key]
        for name in ratios:
            num, den = name.split("/")
            if den not in sc["figures"]:
                continue
            expected = sc["figures"][num]["median"] / sc["figures"][den]["median"]
            first = sc["ratios"][name].get("paired_incremental_first")
            if first is not None:  # order-balanced: each order's geometric mean of the pairs, then theirs
                pairs = [a / b for a, b in zip(sc["figures"][num]["samples"], sc["figures"][den]["samples"])]
                logs = [[math.log(r) for r, f in zip(pairs, first) if f == order] for order in (True, False)]
                logs = [g for g in logs if g]
                expected = math.exp(sum(sum(g) / len(g) for g in logs) / len(logs))
            assert sc["ratios"][name]["value"] == pytest.approx(expected), f"{key}.{name}"


def test_repetitions_and_sizes(results: tuple[dict, str]) -> None:
    doc, _ = results
    cfg = doc["benchmark"]["config"]
    assert doc["benchmark"]["mode"] == "tiny" and cfg["reps"] == REPS
    sc = doc["scenarios"]
    for name in ("stock", "cloudckpt"):
        _check_figure(f"step_overhead.{name}", sc["step_overhead"]["figures"][name], n=REPS)
    for name in ("stock_local", "stock_sync_upload", "cloudckpt"):  # every timed save of every repetition
        _check_figure(f"stall.{name}", sc["stall"]["figures"][name], n=REPS * cfg["stall_saves"])
    for key in ("upload", "restore", "upload@seaweedfs", "restore@seaweedfs", "upload_contended",
                "restore_contended", "upload_contended@seaweedfs", "restore_contended@seaweedfs"):
        assert sc[key]["params"]["server"] == (key.partition("@")[2] or "moto")
        for name, fig in sc[key]["figures"].items():
            _check_figure(f"{key}.{name}", fig, n=REPS)
            if fig["unit"] != "MiB/s":
                continue
            # throughput is bytes / seconds of the same repetitions
            nbytes_mib = sc[key]["params"]["checkpoint_mib"]
            for mibps, s in zip(fig["samples"], fig["seconds"]["samples"]):
                assert mibps * s == pytest.approx(nbytes_mib, rel=0.01)
        for m in ("cloudckpt", "transfer_manager"):  # the server's CPU per GiB = its busy share x seconds / GiB
            busy, fig = sc[key]["figures"][f"server_{m}"], sc[key]["figures"][m]
            for got, b, s in zip(sc[key]["figures"][f"server_cpu_{m}"]["samples"], busy["samples"],
                                 fig["seconds"]["samples"]):
                assert got == pytest.approx(b * s * 1024 / sc[key]["params"]["checkpoint_mib"], rel=0.05), key
        if "contended" in key:  # the stand-in's share of CPU 0 during every timed call of every method
            methods = {m for m, fig in sc[key]["figures"].items() if fig["unit"] == "MiB/s"}
            assert {f"standin_{m}" for m in methods} <= set(sc[key]["figures"]), key
    assert sc["upload"]["params"]["checkpoint_mib"] == pytest.approx(cfg["upload_bytes"] / 2**20, rel=0.05)
    assert sc["upload"]["params"]["files"] == cfg["shards"] + 2  # data shards + index + meta
    assert sc["memory"]["params"]["checkpoint_mib"] == pytest.approx(cfg["memory_bytes"] / 2**20, rel=0.05)
    for name in ("cloudckpt", "transfer_manager"):
        _check_figure(f"memory.{name}", sc["memory"]["figures"][name], n=REPS)
    assert sc["memory"]["params"]["peak_reset"] is True  # VmHWM was reset before each measured upload
    for name in ("no_save", "tf_local", "cloudckpt_sync", "cloudckpt_async"):  # one window per timed save
        _check_figure(f"tf2_async.{name}", sc["tf2_async"]["figures"][name], n=REPS * cfg["stall_saves"])


def test_every_variant_did_its_work(results: tuple[dict, str]) -> None:
    """The baselines really uploaded (a baseline that silently did less would win), cloudckpt committed every save."""
    doc, _ = results
    cfg = doc["benchmark"]["config"]
    work = doc["scenarios"]["stall"]["params"]["work"]
    saves_per_run = cfg["stall_saves"] + 1  # + the save at session creation
    assert work["cloudckpt_committed"] == [saves_per_run] * REPS
    assert work["cloudckpt_failed"] == [0] * REPS
    assert all(mib >= saves_per_run * cfg["stall_bytes"] / 2**20 for mib in work["stock_sync_upload_mib"])
    assert doc["scenarios"]["step_overhead"]["params"]["work"]["cloudckpt_committed"] == [2] * REPS  # creation, end
    tf2 = doc["scenarios"]["tf2_async"]["params"]
    saves = tf2["warmup_steps"] // cfg["stall_save_steps"] + cfg["stall_saves"]
    assert tf2["work"]["cloudckpt_committed_per_run"] == [saves] * (2 * REPS)  # sync and async, every save
    for key in ("incremental", "incremental@seaweedfs"):  # fine-tuning copied parts; dense copied nothing
        work = doc["scenarios"][key]["params"]["work"]
        assert all(mib > 0 for mib in work["fine_tune_copied_mib"]) and not any(work["dense_copied_mib"])


def test_environment_and_table(results: tuple[dict, str]) -> None:
    doc, stdout = results
    assert doc["machine"]["cores"] and doc["machine"]["cpu"]
    for package in ("python", "cloudckpt", "s3fs", "boto3", "moto"):
        assert doc["versions"].get(package), package
    assert "tensorflow" in doc["versions"] or "tensorflow-cpu" in doc["versions"]
    for key in SCENARIOS:
        assert doc["scenarios"][key]["title"] in stdout
    assert "ratio cloudckpt/transfer_manager" in stdout


def test_quartiles_stay_between_min_and_max_for_samples_equal_but_for_the_last_bit():
    """statistics.quantiles interpolates: for two samples one bit apart its q1 came out above the median (a CI
    run's server CPU per GiB: equal CPU ticks over nearly equal seconds)."""
    from bench.common import summarize

    for samples in ([3.7736660268713207, 3.7736660268713202], [1.0000000000000002, 1.0, 1.0000000000000002],
                    [0.1 + 0.2, 0.3, 0.30000000000000004, 0.3]):
        fig = summarize(samples, "x")
        assert fig["min"] <= fig["q1"] <= fig["median"] <= fig["q3"] <= fig["max"], samples
