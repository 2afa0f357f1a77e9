"""The installed wheel carries every module of the plugin package (a subpackage missing from pyproject's package
list would import in an editable checkout and fail after `pip install .`) and nothing else: the repo's tools stay
in the checkout, and the judge's `openai` is an extra.

The wheel is built from a copy of the source without `build/`, where setuptools keeps modules of earlier builds
(a module removed from the package would still be packed from there)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_plugin_module(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "sharelora_plugin", source / "sharelora_plugin", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "sharelora_plugin").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert "sharelora_plugin/planning/stability.py" in names
    # only the plugin, its CLI and what they import: the repo's tools (asset preparation, the commonsense
    # evaluator, the LLaVA scripts, benchmarks) stay in the checkout
    packaged = {name for name in names if name.endswith(".py")}
    assert packaged == modules, sorted(packaged ^ modules)
    assert not any(name.startswith(("bench/", "llava/", "tests/")) for name in names)
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist")
    ]
    openai = [line for line in requires if line.split(":")[1].strip().startswith("openai")]
    assert openai and all("extra ==" in line for line in openai), openai  # the judge's extra only


def test_readme_layout_lists_every_plugin_module():
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Layout\n.*?```\n(.*?)```", text, re.S | re.M)
    assert block, "README.md needs a '## Layout' section with the module list in a code block"
    listed, inside = set(), False
    for line in block.group(1).splitlines():
        if not line.startswith(" "):  # a top-level folder
            inside = line.startswith("sharelora_plugin/")
            continue
        name = line.split()[0]
        if inside and name.endswith(".py"):
            indent = len(line) - len(line.lstrip(" "))
            listed.add(("sharelora_plugin/" if indent == 2 else "sharelora_plugin/planning/") + name)
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "sharelora_plugin").rglob("*.py")}
    assert listed == modules, {
        "not listed": sorted(modules - listed),
        "not in the tree": sorted(listed - modules),
    }
