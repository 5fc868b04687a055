"""Shared fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A throwaway Prefect API server (SQLite in a temp dir) for the whole test session, started once (~5 s),
    with PREFECT_HOME in a temp dir (tests never touch ~/.prefect) and no telemetry (no network)."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    offline = {PREFECT_HOME: tmp_path_factory.mktemp("prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(offline), prefect_test_harness():
        yield
