"""Shared fixtures: the real Omniglot (required in CI), tiny generated Omniglot-layout zips."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "omniglot"


def real_data_dir() -> Path | None:
    path = Path(os.environ.get("MANN_DATA_DIR") or DEFAULT_DATA)
    return path if (path / "images_background.zip").exists() or (path / "images_background").exists() else None


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The real Omniglot. Missing data fails in CI (CI=true) and skips, loudly, elsewhere."""
    path = real_data_dir()
    if path is None:
        msg = f"real Omniglot not found (MANN_DATA_DIR or {DEFAULT_DATA})"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(autouse=True)
def _data_env(monkeypatch, tmp_path_factory):
    """Point MANN_DATA_DIR at the real data for every test (tests that need another set override it)."""
    path = real_data_dir()
    if path is not None:
        monkeypatch.setenv("MANN_DATA_DIR", str(path))


def png_bytes(seed: int, size: int = 105) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.ones((size, size), dtype=bool)
    y, x = rng.integers(10, size - 30, size=2)
    h, w = rng.integers(5, 25, size=2)
    img[y : y + h, x : x + 3] = False  # a vertical stroke
    img[y : y + 3, x : x + w] = False  # a horizontal stroke
    buf = io.BytesIO()
    Image.fromarray(img).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_zip(path: Path, source: str, alphabets: int, chars: int, drawers: int = 20, first_id: int = 1,
                  extra: dict[str, bytes] | None = None) -> int:
    """Write a small zip in the standard layout; returns the next free character id."""
    cid = first_id
    with zipfile.ZipFile(path, "w") as z:
        for a in range(alphabets):
            for c in range(chars):
                for d in range(1, drawers + 1):
                    name = f"{source}/Alphabet_{a}/character{c + 1:02d}/{cid:04d}_{d:02d}.png"
                    z.writestr(name, png_bytes(cid * 100 + d))
                cid += 1
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return cid


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A 2-source Omniglot-layout directory: 12 + 8 characters x 20 drawers."""
    nxt = make_tiny_zip(tmp_path / "images_background.zip", "images_background", alphabets=3, chars=4)
    make_tiny_zip(tmp_path / "images_evaluation.zip", "images_evaluation", alphabets=2, chars=4, first_id=nxt)
    return tmp_path
