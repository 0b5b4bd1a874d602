"""The manifest napari loads is the top-level napari.yaml, valid, from a source tree and from a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

from npe2 import PluginManager, PluginManifest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_manifest_is_valid_and_is_the_one_napari_loads():
    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    assert manifest.name == "napari-nephro"
    pm = PluginManager()
    pm.discover(include_npe1=False)
    installed = pm.get_manifest("napari-nephro")
    (entry_point,) = metadata.distribution("napari-nephro").entry_points.select(group="napari.manifest")
    package, filename = entry_point.value.split(":")
    assert (resources.files(package) / filename).read_text() == (ROOT / "napari.yaml").read_text()
    assert installed.contributions == manifest.contributions
    commands = {c.id for c in installed.contributions.commands}
    assert {"napari-nephro.get_reader", "napari-nephro.sample_slide", "napari-nephro.slide_info"} <= commands


def test_every_command_imports():
    import importlib

    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_wheel_carries_the_manifest_as_a_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("napari_nephro-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read("napari_nephro/napari.yaml").decode() == (ROOT / "napari.yaml").read_text()
        shipped = sorted(p.name for p in (ROOT / "src" / "napari_nephro" / "sample_data").iterdir())
        assert len(shipped) == 9 and all(f"napari_nephro/sample_data/{name}" in names for name in shipped)
        for model in ("default", "default_nuclei"):  # the shipped glomerulus and nuclei models
            for name in ("config.json", "model.safetensors", "metrics.csv"):
                assert f"napari_nephro/models/{model}/{name}" in names
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "napari-nephro = napari_nephro:napari.yaml" in entry_points
    assert "nephro = napari_nephro.cli:main" in entry_points
