"""Atomic file output: a crash or Ctrl-C never leaves a half-written file.

Every writer goes to a temporary file in the target folder, flushes and
fsyncs it, renames it over the target (atomic on POSIX), then fsyncs the
folder so that the rename survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import BHPEFTError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable
    return path


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for name in ("bhpeft_ppl", "torch", "pyro-ppl", "transformers", "arviz", "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def source_commit() -> str | None:
    """The git commit of the checkout this package is imported from, with ``+dirty`` when
    the package or the analysis scripts have uncommitted changes; ``None`` outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=20, check=True)
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", "bhpeft_ppl", "analyses/*.py"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


RUN_MARKERS = ("run.json", "metrics.json", "config.toml")


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a hidden sibling and move it to ``path`` only when the block succeeds.

    A crash or Ctrl-C leaves ``path`` as it was (and removes the partial folder).
    An existing ``path`` is replaced only if it is empty or a previous run
    folder (it holds one of :data:`RUN_MARKERS`); anything else is an error, so
    that no user file is ever deleted.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise BHPEFTError(f"output {path} exists and is not a folder; choose another --out")
        if any(path.iterdir()) and not any((path / m).exists() for m in RUN_MARKERS):
            raise BHPEFTError(f"output folder {path} is not empty and is not a run folder; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; give the run folder the usual permissions
    except OSError as err:
        raise BHPEFTError(f"cannot write the output folder {path}: {err.strerror}; choose a writable --out") from None
    try:
        yield staging
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "run")
        os.replace(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
