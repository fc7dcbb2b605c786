"""Packaging (issue 23): the wheel carries the embedded assets and none of the research code; installed
into a fresh environment holding only the core dependencies, it runs the main job from another
folder, and the commands that need an extra say which in one ``error:`` line before any work.

The fresh environment is a new virtual environment whose only other packages are the core
requirements' distributions (transitively), reached through a ``.pth`` to a folder of symlinks into
this environment: no re-download, and nothing of the extras (gradio, matplotlib, torchvision,
lmms-eval) is importable there."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = ["torch", "transformers", "accelerate", "pillow", "numpy"]
MAX_ASSET_BYTES = 20_000_000
RESEARCH = ("eval/research", "/research/", "train.py", "train_video.py", "probe_video.py", "holitom_tau.py",
            "gpu_train.sh", "make_assets.py", ".parquet", "eval/results/")


def _copy_sources(dst: Path) -> None:
    """What a checkout holds (tracked and untracked-not-ignored files): the build writes next to them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)


def _closure(roots: list[str]) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].strip()
        key = name.lower().replace("_", "-")
        if not key or key in seen:
            continue
        try:
            seen[key] = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        todo += [r for r in seen[key].requires or [] if "extra ==" not in r]
    return list(seen.values())


def _core_view(dst: Path) -> None:
    """Symlinks to every top-level entry of the core requirements' distributions."""
    dst.mkdir()
    for dist in _closure(CORE):
        base = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if (base / top).exists() and not (dst / top).exists():
                os.symlink(base / top, dst / top)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    _copy_sources(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("tokenprune-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wheel) -> Path:
    """bin/ of a new venv with the wheel installed and only the core dependencies importable."""
    root = tmp_path_factory.mktemp("fresh")
    _core_view(root / "core")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    py = root / "env" / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_core_deps.pth").write_text(str(root / "core") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    return root / "env" / "bin"


def _run(fresh: Path, cwd: Path, *args: str, exe: str = "tokenprune") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENPRUNE_CACHE=str(cwd / "cache"))
    return subprocess.run([str(fresh / exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_ships_the_assets_and_no_research_code(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    sizes = {i.filename: i.file_size for i in zipfile.ZipFile(wheel).infolist()}
    for need in ["tokenprune/assets/demo.png", "tokenprune/assets/tiny-llava-vqa/model.safetensors",
                 "tokenprune/assets/tiny-ov-video/model.safetensors", "tokenprune/assets/examples/clip0.gif",
                 "tokenprune/assets/examples/examples.json", "tokenprune/eval/tasks/tokenprune_vqa/tokenprune_vqa.yaml",
                 "tokenprune/eval/bench/run.py", "tokenprune/eval/lmms/model.py", "tokenprune/eval/synthetic/fidelity.py"]:
        assert need in names
    assert sum(s for n, s in sizes.items() if n.startswith("tokenprune/assets/")) <= MAX_ASSET_BYTES
    assert not [n for n in names if any(r in n for r in RESEARCH)]


def test_the_installed_wheel_runs_the_main_job_from_another_folder(fresh, tmp_path):
    probe = _run(fresh, tmp_path, "-c", "import tokenprune, tokenprune.runner as r; print(tokenprune.__file__, r.ASSETS)",
                 exe="python")
    where, assets = probe.stdout.split()
    assert str(fresh.parent) in where and str(REPO) not in where and Path(assets, "tiny-llava-vqa").is_dir()
    res = _run(fresh, tmp_path, "run", "--strategy", "hiprune", "--keep", "0.25", "--json")
    assert res.returncode == 0, res.stderr
    import json

    report = json.loads(res.stdout)
    assert report["answer"] == "blue" and report["visual_tokens_kept"] == 64
    assert "Traceback" not in res.stderr and "Warning" not in res.stderr
    assert (tmp_path / report["overlay"]).is_file() or Path(report["overlay"]).is_file()
    assert Path(report["overlay"]).resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("args, extra", [(["demo"], "demo"), (["bench", "--preset", "tiny"], "eval"),
                                         (["run", "--video", "x.gif"], "vision"), (["sweep"], "eval")])
def test_a_missing_extra_is_one_error_line_before_any_work(fresh, tmp_path, args, extra):
    res = _run(fresh, tmp_path, *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: ") and f'tokenprune[{extra}]' in line
    assert not (tmp_path / "tokenprune_out").exists()
