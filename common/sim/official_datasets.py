"""The official LIBERO demonstration datasets (human teleoperation), downloaded on Modal only."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


# ---------------------------------------------------------------------------- official datasets
OFFICIAL_DATASET_URLS = {
    # Published by the LIBERO authors (the Box links in LIBERO's README / download script).
    # libero_10 and libero_90 share the LIBERO-100 archive.
    "libero_spatial": "https://utexas.box.com/shared/static/04k94hyizn4huhbv5sz4ev9p2h1p6s7f.zip",
    "libero_object": "https://utexas.box.com/shared/static/avkklgeq0e1dgzxz52x488whpu8mgspk.zip",
    "libero_goal": "https://utexas.box.com/shared/static/iv5e4dos8yy2b212pkzkpxu9wbdgjfeg.zip",
    "libero_10": "https://utexas.box.com/shared/static/cv73j8zschq8auh9npzt876fdc1akvmk.zip",
    "libero_90": "https://utexas.box.com/shared/static/cv73j8zschq8auh9npzt876fdc1akvmk.zip",
}


def _download(url: str, dest: Path, attempts: int = 3) -> None:
    """Stream `url` to `dest`; retries transient errors, raises RuntimeError after the last."""
    import urllib.error
    import urllib.request

    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out, length=16 << 20)
            return
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if attempt == attempts:
                raise RuntimeError(f"download of {url} failed after {attempts} attempts: {err}") from err


def collect_official_libero_datasets(dest_dir: str | os.PathLike, suites: list[str]) -> dict[str, list[str]]:
    """Download and unpack the official LIBERO demonstration datasets into dest_dir/<suite>/.

    Runs on Modal only (needs internet and ~10-35 GB per suite); never exercised locally.
    libero_10 and libero_90 come in one archive (LIBERO-100). Raises RuntimeError on any failed
    download or an archive without HDF5 files. Returns {suite: [hdf5 paths]}.
    """
    unknown = [s for s in suites if s not in OFFICIAL_DATASET_URLS]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; valid suites: {', '.join(OFFICIAL_DATASET_URLS)}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[str]] = {}
    for suite in suites:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            archive = Path(tmp) / f"{suite}.zip"
            _download(OFFICIAL_DATASET_URLS[suite], archive)
            shutil.unpack_archive(str(archive), tmp)
            files = sorted(Path(tmp).rglob("*.hdf5"))
            if suite in ("libero_10", "libero_90"):
                # The LIBERO-100 archive unpacks to libero_10/ and libero_90/ folders.
                files = [p for p in files if p.parent.name == suite]
            if not files:
                raise RuntimeError(f"archive for {suite} holds no .hdf5 files")
            suite_dir = dest / suite
            suite_dir.mkdir(exist_ok=True)
            for p in files:
                shutil.move(str(p), suite_dir / p.name)
            found[suite] = [str(suite_dir / p.name) for p in files]
    return found
