from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from tests.support import Serve, ServerThread, make_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = "shout"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Starts gateways in threads (``serve(settings)`` or ``serve(**overrides)``), each
    stopped when the test ends."""
    with contextlib.ExitStack() as servers:

        def start(settings: Settings | None = None, /, **overrides: Any) -> ServerThread:
            if settings is not None and overrides:
                raise TypeError("serve() takes settings or overrides of make_settings, not both")
            return servers.enter_context(ServerThread(settings if settings is not None else make_settings(**overrides)))

        yield start


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Building the tiny model (torch, transformers, a trained tokenizer) takes seconds: a
    test that needs it is slow, whether it asks for ``tiny_model_dir`` or runs the
    transformers backend (the backend conformance suite fetches the model by name)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if "tiny_model_dir" in getattr(item, "fixturenames", ()) or "transformers" in params:
            item.add_marker(pytest.mark.slow)


def _missing(what: str) -> None:
    """Skip when an optional dependency is missing, except under CI, where it is a failure:
    CI installs every dependency, so a missing one is a broken setup, not a reason to skip."""
    message = f"{what} is not installed (pip install -e '.[test,local]' 'transformers[serving]')"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " and CI=true")
    pytest.skip(message)


def require_modules(*names: str) -> None:
    for name in names:
        if importlib.util.find_spec(name) is None:
            _missing(f"the Python package {name!r}")


def require_program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        _missing(f"the program {name!r}")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and its tokenizer, built once per test session."""
    require_modules("torch", "transformers", "tokenizers")
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def example_backend_source() -> str:
    """The example backend of docs/backends.md, as written there."""
    text = (ROOT / "docs" / "backends.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(block for block in blocks if "class ShoutBackend" in block)


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Installs the documented example as a third-party distribution (a module plus a
    ``.dist-info`` with ``entry_points.txt``) on ``sys.path``; yields its entry-point name."""
    site = tmp_path_factory.mktemp("site-packages")
    (site / "shout_backend.py").write_text(example_backend_source())
    info = site / "shout_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[gateway.backends]\n{EXAMPLE_PLUGIN} = shout_backend:ShoutBackend\n")
    (info / "RECORD").write_text("")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield EXAMPLE_PLUGIN
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("shout_backend", None)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster of three primaries: GATEWAY_TEST_REDIS_CLUSTER_URL when set (CI starts
    one), else one started here from redis-server for the session."""
    from tests.redis_support import TEST_REDIS_CLUSTER_URL, PrivateRedisCluster

    if TEST_REDIS_CLUSTER_URL:
        yield TEST_REDIS_CLUSTER_URL
        return
    servers = PrivateRedisCluster(tmp_path_factory.mktemp("redis-cluster"), require_program("redis-server"),
                                  require_program("redis-cli"))
    try:
        servers.start()
        yield servers.url
    finally:
        servers.stop()


@pytest.fixture
def private_redis_cluster(tmp_path: Path) -> Iterator[Any]:
    """A Redis Cluster of the test's own, whose nodes it may stop and start again."""
    from tests.redis_support import PrivateRedisCluster

    servers = PrivateRedisCluster(tmp_path, require_program("redis-server"), require_program("redis-cli"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()
