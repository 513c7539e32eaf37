"""The wheel installs one top-level package, `wattserve`, holding every package folder of the
repository: a top-level `kernels` would overwrite PyPI's `kernels`, which transformers installs."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("engine", "server", "kernels")


def test_wheel_holds_only_wattserve_with_every_package_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    [wheel] = tmp_path.glob("wattserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"wattserve"}
    packaged = {str(Path(name).parent) for name in names if name.endswith("/__init__.py")}
    in_repo = {"wattserve/" + str(init.parent.relative_to(REPO))
               for folder in PACKAGE_FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert packaged == in_repo  # a new subpackage must be listed in pyproject's packages
