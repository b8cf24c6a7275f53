from tests.collector.conftest import collector, start_collector  # noqa: F401 - fixtures
