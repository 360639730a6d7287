import sys

import pytest

from selfflow.core.runtime import tune_cpu_allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only exists on Linux")
def test_allocator_tuning_is_accepted_by_glibc():
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True  # idempotent: a second run in the same process is fine
