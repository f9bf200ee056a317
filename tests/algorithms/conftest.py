import pytest
from algo_helpers import tiny_parts


@pytest.fixture()
def parts():
    return tiny_parts()
