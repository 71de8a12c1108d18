"""The installed package is whole: the schemas ship inside it (and equal the repository's
top-level copies, the contract producers in other languages read), and the optional
dependencies stay optional."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from coalmine import events, simulator

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "coalmine" / "schemas"
PUBLISHED = ROOT / "schemas"


def _json_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_top_level_schemas_are_byte_identical_copies_of_the_packaged_ones():
    packaged, published = _json_files(PACKAGED), _json_files(PUBLISHED)
    assert sorted(packaged) == sorted(f"{kind}.json" for kind in events.KINDS)
    assert sorted(published) == sorted(packaged), (
        "schemas/ and coalmine/schemas/ hold different files"
    )
    differ = [name for name in packaged if packaged[name] != published[name]]
    assert not differ, (
        f"schemas/ and coalmine/schemas/ differ in {differ}: copy coalmine/schemas/*.json to schemas/"
    )


def test_schema_path_and_load_schema_read_the_packaged_schemas():
    for kind in events.KINDS:
        assert events.schema_path(kind) == PACKAGED / f"{kind}.json"
        assert events.load_schema(kind)["$id"] == f"https://coalmine.dev/schemas/{kind}.json"
    with pytest.raises(ValueError, match="unknown event kind 'alerts'"):
        events.load_schema("alerts")


@pytest.mark.slow  # pip builds the wheel: seconds, most of them outside coalmine
@pytest.mark.timeout(240)
def test_the_wheel_ships_the_schemas_reads_them_and_keeps_the_extras_optional(tmp_path):
    # build from a copy: no build/ or egg-info left in the work tree
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "coalmine", src / "coalmine", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("coalmine-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n: zf.read(n) for n in zf.namelist() if n.startswith("coalmine/schemas/")}
        (metadata,) = [
            zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/METADATA")
        ]
        zf.extractall(tmp_path / "site")
    assert shipped == {
        f"coalmine/schemas/{name}": data for name, data in _json_files(PUBLISHED).items()
    }
    # the optional dependencies stay optional
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    hard = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r
    }
    assert not hard & {"river", "pandas", "pyarrow", "pytest"}, hard
    assert any(r.startswith("river") and 'extra == "demo"' in r for r in requires), requires
    # the unpacked wheel, imported ahead of the editable install, finds its own schemas
    code = (
        "from coalmine import events; p = events.schema_path('prediction'); "
        "print(p.is_file(), p.is_relative_to(r'%s'), events.load_schema('alert')['title'])"
        % (tmp_path / "site")
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split(maxsplit=2)[:2] == ["True", "True"], run.stdout


def test_load_shuttle_without_river_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "river", None)
    monkeypatch.setitem(sys.modules, "river.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'coalmine\[demo\]'"):
        simulator.load_shuttle.__wrapped__()
