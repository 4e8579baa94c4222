"""What the tests share: tree builders, mounts with guaranteed teardown, the kernel comparison,
image builders, registries, small FUSE filesystems for fault injection.

Imported before any of its modules, so the assertion helpers are registered for pytest's assertion
rewriting here, before they are first imported: their failures explain themselves too.
"""

import pytest

pytest.register_assert_rewrite("tests.support.writes", "tests.support.differential", "tests.support.compare")
