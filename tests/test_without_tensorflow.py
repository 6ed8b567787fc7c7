"""cloudckpt without TensorFlow (issue 14, acceptance 5): TensorFlow is an extra, not a requirement.

The CLI and the library run in child processes in which TensorFlow and Keras
cannot be imported (``support/no_tensorflow/sitecustomize.py``, a meta path
finder that answers like a missing package and records every attempt),
against the moto S3 server. The checkpoints come from a real training run with
TF's stock hook in this process; what the children did is checked here with
TensorFlow and boto3. The package metadata is read from ``pyproject.toml``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from cloudckpt._frameworks import import_framework
from support.checks import assert_all_committed_intact, log_entries

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = Path(__file__).resolve().parent / "support" / "no_tensorflow"
TF_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly", "tf-nightly-cpu", "keras",
                    "tf-keras"}
INSTALL = "pip install 'cloudckpt[tensorflow]'"
STEPS = [0, 10, 20, 30]
# Where pip evaluates markers: Linux x86_64 and aarch64, an Apple silicon Mac, Windows.
PLATFORMS = {"x86_64": "Linux", "aarch64": "Linux", "arm64": "Darwin", "AMD64": "Windows"}


# -- the package metadata ---------------------------------------------------------------------------

def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _resolve(requirements: list[str], extras: dict[str, list[str]], machine: str, seen: tuple[str, ...] = ()
             ) -> set[str]:
    """Distribution names ``requirements`` install on ``machine``, self-references (cloudckpt[x]) followed."""
    names: set[str] = set()
    environment = {"platform_machine": machine, "platform_system": PLATFORMS[machine], "sys_platform":
                   {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}[PLATFORMS[machine]], "extra": ""}
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        if req.name == "cloudckpt":
            for extra in sorted(req.extras):
                assert extra in extras and extra not in seen, f"cloudckpt[{extra}] is no extra (or a cycle)"
                names |= _resolve(extras[extra], extras, machine, (*seen, extra))
        else:
            names.add(req.name.lower().replace("_", "-"))
    return names


@pytest.mark.parametrize("machine", sorted(PLATFORMS))
def test_tensorflow_is_an_extra(machine):
    project = _project()["project"]
    extras = project["optional-dependencies"]
    assert not _resolve(project["dependencies"], extras, machine) & TF_DISTRIBUTIONS  # plain `pip install cloudckpt`
    expected = {"tensorflow-cpu"} if machine == "x86_64" else {"tensorflow"}
    assert _resolve(extras["tensorflow"], extras, machine) & TF_DISTRIBUTIONS == expected
    for extra in ("test", "demo"):  # ./scripts/test and ./scripts/demo train models on a fresh machine
        assert _resolve(extras[extra], extras, machine) & TF_DISTRIBUTIONS == expected, extra


def test_license_metadata_is_an_spdx_expression():
    """PEP 639 form: setuptools >= 77 reads it without a deprecation warning (the table form warns)."""
    config = _project()
    assert config["project"]["license"] == "Apache-2.0"
    assert all((ROOT / name).is_file() for name in config["project"]["license-files"])
    setuptools = next(Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools"))
    assert "77.0.0" in setuptools.specifier and "76.9" not in setuptools.specifier
    assert not any(c.startswith("License ::") for c in config["project"].get("classifiers", []))  # PEP 639: not both


# -- the ImportError ---------------------------------------------------------------------------------

def test_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what Python does for a package that is absent
    with pytest.raises(ImportError) as caught:
        import_framework("tensorflow", "cloudckpt.CheckpointSaverHook")
    assert isinstance(caught.value, ModuleNotFoundError) and caught.value.name == "tensorflow"
    assert str(caught.value).startswith("cloudckpt.CheckpointSaverHook needs TensorFlow, which is not installed")
    assert INSTALL in str(caught.value) and sys.executable in str(caught.value)


def test_a_broken_tensorflow_keeps_its_own_error(monkeypatch):
    """Only an absent framework is translated: a missing submodule is a broken install, not a missing extra."""
    monkeypatch.setitem(sys.modules, "tensorflow.python.pywrap_tfe", None)
    with pytest.raises(ModuleNotFoundError) as caught:
        import_framework("tensorflow.python.pywrap_tfe", "cloudckpt.CheckpointSaverHook")
    assert caught.value.name == "tensorflow.python.pywrap_tfe" and "cloudckpt[" not in str(caught.value)


# -- the CLI and the library in a Python without TensorFlow ------------------------------------------

@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory) -> Path:
    """Checkpoints written by TF's own CheckpointSaverHook (steps 0, 10, 20, 30 + graph.pbtxt)."""
    import tensorflow as tf

    from support.tf_model import train

    directory = tmp_path_factory.mktemp("stock")
    train(lambda s: tf.compat.v1.train.CheckpointSaverHook(str(directory), save_steps=10), last_step=30)
    return directory


def _env(record: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               CLOUDCKPT_BLOCKED_IMPORTS=str(record),
               PYTHONPATH=os.pathsep.join([str(BLOCKER), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_ENDPOINT_URL", None)
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


LIBRARY = r"""
import json, sys
try:
    import tensorflow  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("tensorflow is importable: the blocker is not active")
import cloudckpt

url, endpoint, local_dir = sys.argv[1:4]
options = {"endpoint_url": endpoint}
out = {"listed": [c.step for c in cloudckpt.list_checkpoints(url, options)],
       "latest": cloudckpt.latest_checkpoint(url, options).step,
       "verified": cloudckpt.verify(url, storage_options=options, use_store_checksums=False).ok,
       "downloaded": cloudckpt.download_checkpoint(url, local_dir, 20, storage_options=options),
       "rolled_back_to": cloudckpt.rollback(url, 20, storage_options=options).latest.step,
       "errors": {}}
for name in ("CheckpointSaverHook", "UploadListener"):
    try:
        getattr(cloudckpt, name)
    except ImportError as exc:
        out["errors"][name] = [type(exc).__name__, exc.name, str(exc)]
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
print(json.dumps(out))
"""


def test_cli_and_library_without_tensorflow(stock_dir, cloudckpt_s3, tmp_path):
    import tensorflow as tf

    url, options = cloudckpt_s3.url("runs/exp1"), cloudckpt_s3.storage_options
    endpoint = f"endpoint_url={cloudckpt_s3.endpoint}"
    record = tmp_path / "blocked-imports.txt"
    env = _env(record)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return _run(env, "-m", "cloudckpt.cli", *args, "-o", endpoint)

    push = cli("push", str(stock_dir), url)
    assert push.returncode == 0, push.stderr
    assert [line.split(":")[0] for line in push.stdout.splitlines()[:4]] == [f"step {s}" for s in STEPS]
    assert sorted(assert_all_committed_intact(url, options)) == STEPS

    listing = cli("ls", url, "--json")
    assert listing.returncode == 0, listing.stderr
    assert [(r["step"], r["status"]) for r in json.loads(listing.stdout)] == [(s, "committed") for s in STEPS]

    check = cli("verify", url, "--all")
    assert check.returncode == 0, check.stdout + check.stderr
    assert [line.split()[:2] for line in check.stdout.splitlines()[:4]] == [["OK", "step"]] * 4

    pulled = tmp_path / "pulled"
    pull = cli("pull", url, str(pulled))
    assert pull.returncode == 0, pull.stderr
    assert "Pulled step 30" in pull.stdout

    prune = cli("gc", url, "--keep", "3")
    assert prune.returncode == 0, prune.stderr
    assert "delete step 0: model.ckpt-0" in prune.stdout
    assert sorted(assert_all_committed_intact(url, options)) == [10, 20, 30]

    assert not record.exists(), record.read_text()  # no command even tried to import a framework

    library = _run(env, "-c", LIBRARY, url, cloudckpt_s3.endpoint, str(tmp_path / "downloaded"))
    assert library.returncode == 0, library.stderr
    out = json.loads(library.stdout)
    assert out["listed"] == [10, 20, 30] and out["latest"] == 30 and out["verified"] is True
    assert out["downloaded"] == str(tmp_path / "downloaded" / "model.ckpt-20")
    assert out["rolled_back_to"] == 20
    assert [e["reason"] for e in log_entries(url, options) if e["type"] == "writer"][-1] == "rollback"
    for name in ("CheckpointSaverHook", "UploadListener"):
        kind, missing, message = out["errors"][name]
        assert kind == "ModuleNotFoundError" and missing == "tensorflow", out["errors"]
        assert message.startswith(f"cloudckpt.{name} needs TensorFlow") and INSTALL in message
    assert out["loaded"] == []
    assert set(record.read_text().split()) == {"tensorflow"}  # the probe and the two TF adapters, nothing else

    demo = _run(env, "-m", "cloudckpt.cli", "demo")
    assert demo.returncode == 2, demo.stdout + demo.stderr
    assert "pip install 'cloudckpt[demo]'" in demo.stderr and "Traceback" not in demo.stderr

    # What the children downloaded is what TF wrote, read back with TensorFlow here.
    for directory, step in ((pulled, 30), (tmp_path / "downloaded", 20)):
        assert tf.train.latest_checkpoint(str(directory)) == str(directory / f"model.ckpt-{step}")
        assert (tf.train.load_variable(str(directory / f"model.ckpt-{step}"), "w")
                == tf.train.load_variable(str(stock_dir / f"model.ckpt-{step}"), "w")).all()


# -- a real resolver, next to TensorFlow (networked: slow) -------------------------------------------

@pytest.mark.slow
def test_pip_resolves_no_tensorflow_cpu_next_to_tensorflow(tmp_path):
    """pip's resolver, asked for ``tensorflow`` and this checkout together, picks no tensorflow-cpu."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    report = tmp_path / "report.json"
    proc = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           "tensorflow>=2.16", str(ROOT)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"tensorflow", "cloudckpt"} <= names and "tensorflow-cpu" not in names, sorted(names)
