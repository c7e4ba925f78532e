import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False, help="run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip_gpu = pytest.mark.skip(reason="GPU test: run with --gpu on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


#: Variables by which a launcher tells a process its place in a process group.
LAUNCH_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
    "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE",
)  # fmt: skip
_SESSION_ENV = dict(os.environ)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test starts from the environment the session started with. Lightning's in-process
    spawn launches (`mpipemoe_spawn` trainers in tests, also in module-scoped fixtures, which
    run before this fixture) write `MASTER_PORT` & co. into this process's environment; a later
    test that launches a command would hand its children a port of a finished run (seen: a
    multirun whose jobs all reused one leaked port)."""
    for key in LAUNCH_VARIABLES:
        if key in os.environ and _SESSION_ENV.get(key) != os.environ[key]:
            if key in _SESSION_ENV:
                os.environ[key] = _SESSION_ENV[key]
            else:
                del os.environ[key]
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
