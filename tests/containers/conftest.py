"""The container and commit tests' shared store: the standard images (made by umoci), imported once
per module by ``overlayctl image import``, and a session on it per test that unmounts and removes
whatever the test mounted and made."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerctl import Ctl, build_images, store_session, store_with_images
from tests.support.imagebuild import Images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return build_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Path:
    """A store holding test/full and test/other; the tests add containers and images, and a
    session removes the containers again."""
    root = tmp_path_factory.mktemp("store")
    store_with_images(root, images, images.full, images.other)
    return root


@pytest.fixture
def ctl(store_root: Path, tmp_path: Path) -> Iterator[Ctl]:
    with store_session(store_root, tmp_path) as ctl:
        yield ctl
