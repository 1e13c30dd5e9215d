"""The image cache: ``~/.cache/ferry-lab/<recipe-hash>/``, one directory per recipe.

The hash covers ``lab/image.py``, ``lab/firstboot.sh``, the suite and the
package list, so changing the recipe builds a new image and an unchanged one
(a fresh CI clone too) reuses the cache. Old ``<hash>`` directories are not
removed automatically: ``rm -rf`` them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lab import image as recipe
from lab.errors import LabError


def cache_root() -> Path:
    """FERRY_LAB_CACHE, else $XDG_CACHE_HOME/ferry-lab, else ~/.cache/ferry-lab."""
    if os.environ.get("FERRY_LAB_CACHE"):
        return Path(os.environ["FERRY_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ferry-lab"


def recipe_hash() -> str:
    digest = hashlib.sha256(recipe.SUITE.encode())
    digest.update("\n".join(recipe.PACKAGES).encode())
    for path in recipe.RECIPE_FILES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built, cached image; its files are never written after the build."""

    dir: Path

    system = property(lambda self: self.dir / "system.raw")
    data = property(lambda self: self.dir / "data.raw")
    key = property(lambda self: self.dir / "id_ed25519")
    kernel = property(lambda self: self.dir / "vmlinuz")

    @property
    def facts(self) -> dict:
        return json.loads((self.dir / "build.json").read_text())

    def figures(self) -> dict:
        try:
            return json.loads((self.dir / "figures.json").read_text())
        except (OSError, ValueError):
            return {}

    def record(self, **figures: object) -> None:
        """Merge measured figures into figures.json (atomically: runs may overlap)."""
        merged = {**self.figures(), **figures}
        tmp = self.dir / f".figures.{os.getpid()}"
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        tmp.replace(self.dir / "figures.json")


def built_image() -> Image | None:
    """The cached image for the current recipe if it is built (never builds, never waits)."""
    final = cache_root() / recipe_hash()
    return Image(final) if (final / "build.json").exists() else None


def ensure_image(log=print) -> Image:
    """The cached image for the current recipe, built first if missing.

    Concurrent callers wait on a lock instead of building twice.
    """
    started = time.monotonic()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / recipe_hash()
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "build.json").exists():
            image = Image(final)
            image.record(cached_s=round(time.monotonic() - started, 3))
            log(f"lab image {final.name}: cached ({time.monotonic() - started:.2f} s) in {final}")
            return image
        if os.geteuid() != 0:
            raise LabError(detail="building the lab image needs root (debootstrap, chroot)")
        log(f"lab image {final.name}: building in {final} (a few minutes)")
        work = root / f"{final.name}.build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            facts = recipe.build(work, log)
            facts["cold_build_s"] = round(time.monotonic() - started, 1)
            (work / "build.json").write_text(json.dumps(facts, indent=1, sort_keys=True))
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    image = Image(final)
    image.record(cold_build_s=facts["cold_build_s"], first_boot_s=facts["first_boot_s"])
    log(f"lab image {final.name}: built in {facts['cold_build_s']:.0f} s")
    return image
