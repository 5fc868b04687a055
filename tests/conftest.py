"""Shared fixtures, and the order the suite runs in."""
from __future__ import annotations

import pytest

from tests.helpers import make_tokenizer

# The longest modules first, so that `pytest -n 2 --dist loadfile` (make test) starts them on different workers
# at once and the short ones fill in around them, instead of one of them starting last.
LONGEST_FIRST = ("test_dag.py", "test_dag_external.py", "test_real_weights.py", "test_prefect_server.py", "test_flow.py",
                 "test_logits.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within a rank


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A throwaway Prefect API server (SQLite in a temp dir) for the whole test session, started once (~5 s),
    with PREFECT_HOME in a temp dir (tests never touch ~/.prefect) and no telemetry (no network)."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    offline = {PREFECT_HOME: tmp_path_factory.mktemp("prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    # 120 s, not the harness's 30: on 2 busy cores the server's first start (migrations) can take longer
    with temporary_settings(offline), prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    """tests.helpers.make_tokenizer's small byte-level BPE (a module may override it with its own texts)."""
    return make_tokenizer()
