"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

# A collective whose devices' threads do not all arrive within a time limit aborts the process
# (XLA's default: 40 s); on a 2-core machine running two test workers, a step's 8 device
# threads can wait on each other longer than that without being stuck.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# every test solves its plan (tests/test_plan_cache.py turns the cache on where it tests it)
os.environ["AUTOSHARD_CACHE"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

MESH_SHAPES = [(8,), (2, 4), (4, 2)]


def make_mesh(shape):
    """Meshes as users make them (jax.make_mesh: Explicit axes): 1-D is ("data",), 2-D is
    ("data", "model")."""
    names = ("data",) if len(shape) == 1 else ("data", "model")
    return jax.make_mesh(shape, names)


@pytest.fixture(params=MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def mesh(request):
    return make_mesh(request.param)


# -- native crashes ------------------------------------------------------------------------------
# A worker that dies of a signal (a segfault or an abort in XLA) takes its test with it, and
# xdist reports only "node down"; the dump faulthandler writes is interleaved with the rest of
# the log, and a CI log that keeps only its tail loses the first lines, which name the signal
# and the crashing thread. So each worker writes its dump to a file of its own and the
# controller prints every non-empty one at the end of the run.
FAULTS_ENV = "AUTOSHARD_TEST_FAULTS"


@pytest.hookimpl(trylast=True)   # after pytest's faulthandler plugin has pointed it at stderr
def pytest_configure(config):
    import faulthandler
    import tempfile
    if not hasattr(config, "workerinput"):         # the controller, or a run without xdist
        if FAULTS_ENV not in os.environ:
            config._autoshard_fault_folder = tempfile.mkdtemp(prefix="autoshard-faults-")
            os.environ[FAULTS_ENV] = config._autoshard_fault_folder
        return
    folder = os.environ.get(FAULTS_ENV)
    if folder:
        name = f"{config.workerinput['workerid']}-{os.getpid()}.txt"
        config._autoshard_faults = open(os.path.join(folder, name), "w")
        faulthandler.enable(file=config._autoshard_faults, all_threads=True)


def pytest_terminal_summary(terminalreporter, config):
    folder = os.environ.get(FAULTS_ENV)
    if hasattr(config, "workerinput") or not folder or not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as dump:
            lines = _abridged(dump.read().splitlines())
        if lines:
            terminalreporter.section(f"native crash dump of worker {name[:-4]}")
            terminalreporter.write_line("\n".join(lines))


def pytest_unconfigure(config):
    import shutil
    folder = getattr(config, "_autoshard_fault_folder", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(FAULTS_ENV, None)


def _abridged(lines: list[str], frames: int = 12) -> list[str]:
    """A faulthandler dump with each thread's innermost ``frames`` frames (the rest are
    pytest's and execnet's) and without its list of extension modules."""
    kept, depth = [], 0
    for line in lines:
        if line.startswith("Extension modules:"):
            continue
        depth = depth + 1 if line.startswith("  File ") else 0
        if depth <= frames:
            kept.append(line)
    return kept
