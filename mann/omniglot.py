"""Omniglot: read the standard zips or folders, verify them, preprocess once into a cached uint8 array, split.

Layout (Lake et al.): ``images_background/<Alphabet>/characterNN/NNNN_DD.png`` (964 characters) and
``images_evaluation/...`` (659 characters), 20 drawers each, 105x105 1-bit PNGs. The two halves are pooled into
1623 characters ordered by their id NNNN; the paper's split is 1200 training / 423 test characters at random.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from .config import DataConfig

SOURCES = ("images_background", "images_evaluation")
EXPECTED_CHARACTERS = {"images_background": 964, "images_evaluation": 659}
DRAWERS = 20
CACHE_VERSION = 1

# Official downloads (brendenlake/omniglot, python/); md5 of the official zip files.
DOWNLOADS = {
    "images_background": (
        "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    "images_evaluation": (
        "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
}

_PNG_NAME = re.compile(r"^(\d{4})_(\d{2})\.png$")


class DataError(RuntimeError):
    """Omniglot data is missing, corrupt or not in the standard layout; the message names the file."""


@dataclass(frozen=True)
class Omniglot:
    """All characters, preprocessed.

    Attributes:
        images: ``[characters, drawers, S, S]`` uint8, ink = 255.
        names: ``"<source>/<Alphabet>/<characterNN>"`` per character, ordered by character id.
        digest: content digest of the sources and preprocessing (the cache key).
    """

    images: np.ndarray
    names: tuple[str, ...]
    digest: str
    cache_path: Path | None = None
    from_cache: bool = False


@dataclass(frozen=True)
class Splits:
    """Image pools per split, each ``[classes, drawers, S, S]`` uint8; rotations are extra training classes."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_characters: np.ndarray
    val_characters: np.ndarray
    test_characters: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# Finding and fingerprinting the sources


def find_sources(data_dir: Path, origin: str | None = None) -> dict[str, Path]:
    """Map each present source (``images_background``, ``images_evaluation``) to its zip or folder. ``origin``:
    the setting the directory came from (``MANN_DATA_DIR``, ``data.data_dir``), named in the errors."""
    where = f" (from {origin})" if origin else ""
    if not data_dir.exists():
        raise DataError(f"{data_dir}: data directory does not exist{where}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory{where}")
    found = {}
    for name in SOURCES:
        folder, archive = data_dir / name, data_dir / f"{name}.zip"
        if folder.is_dir():
            found[name] = folder
        elif archive.is_file():
            found[name] = archive
    if not found:
        raise DataError(
            f"{data_dir}{where}: no Omniglot found (expected images_background.zip and images_evaluation.zip, "
            "or the extracted folders); `mann data download --data-dir DIR` fetches them"
        )
    return found


def _fingerprint(path: Path) -> str:
    """sha256 of a zip's bytes, or of a folder's PNG names and sizes and modification times."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        for p in sorted(path.rglob("*.png")):
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _entries(source: str, path: Path):
    """Yield ``(relative posix path, bytes loader)`` for every PNG of a source zip or folder."""
    if path.is_dir():
        for p in sorted(path.rglob("*.png")):
            yield f"{source}/{p.relative_to(path).as_posix()}", p.read_bytes
        return
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip file ({exc})") from None
    with archive:
        for info in archive.infolist():
            name = info.filename
            pure = PurePosixPath(name)
            # Refuse entries that would escape the source folder, whatever we do with them later.
            if name.startswith(("/", "\\")) or ".." in pure.parts or "\\" in name or ":" in pure.parts[0]:
                raise DataError(f"{path}: unsafe entry {name!r} (absolute path or '..') refused")
            if pure.parts[0] == "__MACOSX" or pure.name == ".DS_Store":
                continue  # macOS archiver extras (present in the official zips)
            if pure.parts[0] != source:
                raise DataError(f"{path}: entry {name!r} is outside the expected top folder '{source}/'")
            if info.is_dir() or not name.endswith(".png"):
                continue

            def load(info=info):
                try:
                    return archive.read(info)
                except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
                    raise DataError(f"{path}: entry {info.filename!r} is corrupt ({exc})") from None

            yield name, load


def _preprocess(png: bytes, size: int, where: str) -> np.ndarray:
    """105x105 1-bit PNG -> ``[size, size]`` uint8 with ink = 255 (area-averaged resize)."""
    try:
        with Image.open(io.BytesIO(png)) as img:
            img = img.convert("L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BOX)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: not a readable PNG ({exc})") from None
    return 255 - arr


def read_source(source: str, path: Path, size: int, verify_counts: bool) -> tuple[list[str], np.ndarray]:
    """Read one source into ``(names, [characters, drawers, size, size] uint8)``, checking the layout."""
    chars: dict[str, dict[int, np.ndarray]] = {}
    ids: dict[str, int] = {}
    for name, load in _entries(source, path):
        parts = PurePosixPath(name).parts
        where = f"{path}: {name}"
        if len(parts) != 4:
            raise DataError(f"{where}: not in the layout {source}/<Alphabet>/<characterNN>/<NNNN_DD>.png")
        m = _PNG_NAME.match(parts[3])
        if not m:
            raise DataError(f"{where}: file name is not NNNN_DD.png")
        key = "/".join(parts[:3])
        char_id, drawer = int(m.group(1)), int(m.group(2))
        if ids.setdefault(key, char_id) != char_id:
            raise DataError(f"{where}: character id {char_id} differs from {ids[key]} in the same folder")
        chars.setdefault(key, {})[drawer] = _preprocess(load(), size, where)
    if not chars:
        raise DataError(f"{path}: no PNG images found under {source}/")
    keys = sorted(chars, key=lambda k: (ids[k], k))
    drawers = len(chars[keys[0]])
    for key in keys:
        got = sorted(chars[key])
        want = list(range(1, (DRAWERS if verify_counts else drawers) + 1))
        if got != want:
            raise DataError(f"{path}: {key} has drawers {_span(got)}, expected {_span(want)}")
    if verify_counts and len(keys) != EXPECTED_CHARACTERS[source]:
        raise DataError(
            f"{path}: {len(keys)} characters, expected {EXPECTED_CHARACTERS[source]} for {source} "
            "(set data.verify_counts: false only for a deliberately reduced data set)"
        )
    images = np.stack([np.stack([chars[k][d] for d in sorted(chars[k])]) for k in keys])
    return keys, images


def _span(values: list[int]) -> str:
    if not values:
        return "none"
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]:02d}..{values[-1]:02d} ({len(values)})"
    return f"{values} ({len(values)})"


def load_omniglot(cfg: DataConfig) -> Omniglot:
    """Read (or load from cache) all characters of the sources in the data directory."""
    data_dir = cfg.resolved_data_dir()
    sources = find_sources(data_dir, cfg.data_dir_origin)
    if cfg.verify_counts and set(sources) != set(SOURCES):
        missing = sorted(set(SOURCES) - set(sources))
        raise DataError(f"{data_dir}: missing {', '.join(missing)} (zip or folder)")
    h = hashlib.sha256(f"v{CACHE_VERSION} size={cfg.image_size} verify={cfg.verify_counts}".encode())
    for name in sorted(sources):
        h.update(f"{name}={_fingerprint(sources[name])}".encode())
    digest = h.hexdigest()
    cache_dir = cfg.resolved_cache_dir()
    cache_path = cache_dir / f"omniglot-{cfg.image_size}px-{digest[:20]}.npz"
    if cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as z:
                return Omniglot(z["images"], tuple(str(n) for n in z["names"]), digest, cache_path, True)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a damaged cache is rebuilt below
    names: list[str] = []
    parts = []
    for name in sorted(sources):
        keys, images = read_source(name, sources[name], cfg.image_size, cfg.verify_counts)
        names += keys
        parts.append(images)
    if len({p.shape[1] for p in parts}) != 1:
        raise DataError(f"{data_dir}: sources have different numbers of drawers per character")
    images = np.concatenate(parts)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, images=images, names=np.array(names))
        os.replace(tmp, cache_path)
    except OSError:
        cache_path = None  # a read-only cache directory only costs the next run the preprocessing
    return Omniglot(images, tuple(names), digest, cache_path, False)


# ---------------------------------------------------------------------------------------------------------------
# Splits


def split_characters(n: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (by ``split_seed``) train / val / test character indices; val is carved out of train."""
    if cfg.train_characters >= n:
        raise DataError(
            f"data.train_characters: {cfg.train_characters} leaves no test characters out of the {n} found"
        )
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    train_all, test = perm[: cfg.train_characters], perm[cfg.train_characters :]
    return np.sort(train_all[cfg.val_characters :]), np.sort(train_all[: cfg.val_characters]), np.sort(test)


def make_splits(data: Omniglot, cfg: DataConfig) -> Splits:
    train_idx, val_idx, test_idx = split_characters(len(data.images), cfg)
    images = torch.from_numpy(data.images)
    train = images[train_idx]
    if cfg.rotations:
        # 90/180/270-degree rotations are new classes (paper section 4.1), training split only.
        train = torch.cat([torch.rot90(train, k, dims=(2, 3)) for k in range(4)])
    return Splits(
        train=train.contiguous(),
        val=images[val_idx].contiguous(),
        test=images[test_idx].contiguous(),
        train_characters=train_idx,
        val_characters=val_idx,
        test_characters=test_idx,
    )


# ---------------------------------------------------------------------------------------------------------------
# Download (for users with internet; never called by the tests)


def download(data_dir: Path, timeout: float = 60.0) -> list[Path]:
    """Fetch the official zips into ``data_dir`` and check their md5; existing verified files are kept."""
    data_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name, (url, md5) in DOWNLOADS.items():
        target = data_dir / f"{name}.zip"
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            done.append(target)
            continue
        tmp = target.with_suffix(".zip.part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
        except OSError as exc:
            raise DataError(f"{url}: download failed ({exc})") from None
        got = hashlib.md5(tmp.read_bytes()).hexdigest()
        if got != md5:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{url}: md5 {got} does not match the official {md5}")
        os.replace(tmp, target)
        done.append(target)
    return done


def describe(cfg: DataConfig) -> dict:
    """What ``mann data check`` prints: sources, counts, cache state, split sizes."""
    t0 = time.perf_counter()
    data = load_omniglot(cfg)
    seconds = time.perf_counter() - t0
    tr, va, te = split_characters(len(data.images), cfg)
    per_source: dict[str, int] = {}
    for n in data.names:
        per_source[n.split("/", 1)[0]] = per_source.get(n.split("/", 1)[0], 0) + 1
    alphabets = len({"/".join(n.split("/")[:2]) for n in data.names})
    return {
        "data_dir": str(cfg.resolved_data_dir()),
        "sources": {k: str(v) for k, v in find_sources(cfg.resolved_data_dir(), cfg.data_dir_origin).items()},
        "characters": len(data.images),
        "characters_per_source": per_source,
        "alphabets": alphabets,
        "drawers": int(data.images.shape[1]),
        "image_size": int(data.images.shape[2]),
        "digest": data.digest,
        "cache": str(data.cache_path) if data.cache_path else None,
        "from_cache": data.from_cache,
        "load_seconds": round(seconds, 3),
        "split": {
            "train": len(tr),
            "val": len(va),
            "test": len(te),
            "train_classes_with_rotations": len(tr) * (4 if cfg.rotations else 1),
        },
    }
