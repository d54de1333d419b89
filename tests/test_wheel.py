"""A newcomer's path: a wheel installed, then ``python -m clip_search`` run from the repository root."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

CHECK = 'import clip_search, clip_search.executors.shard_merger as m; print(clip_search.__file__, m.__file__)'


@pytest.mark.slow
def test_a_wheel_run_from_the_repository_root_finds_the_executors(tmp_path):
    """``python -m`` puts the current directory first: the checkout's clip_search/ (no executors/ inside)
    shadows the wheel's, and the Flow failed with "can not find clip_search.executors.clip_encoder"."""
    source = tmp_path / 'source'  # built from a copy: pip would write build/ and *.egg-info into the checkout
    source.mkdir()
    for name in ('pyproject.toml', 'README.md', 'clip_search', 'executors', 'flows'):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({'ignore': shutil.ignore_patterns('__pycache__')} if (ROOT / name).is_dir() else {}))
    subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path / 'dist'), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / 'dist').glob('clip_search-*.whl')
    python = _venv_with_the_dependencies_but_not_clip_search(tmp_path / 'venv')
    site_packages = next((tmp_path / 'venv' / 'lib').glob('python3*/site-packages'))
    zipfile.ZipFile(wheel).extractall(site_packages)  # a pure-Python wheel installed

    from_elsewhere = subprocess.run([python, '-c', CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert from_elsewhere.stdout.split() == [
        str(site_packages / 'clip_search' / '__init__.py'),
        str(site_packages / 'clip_search' / 'executors' / 'shard_merger.py'),
    ], from_elsewhere.stderr
    from_the_root = subprocess.run([python, '-c', CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert from_the_root.stdout.split() == [
        str(ROOT / 'clip_search' / '__init__.py'),  # the checkout's copy is the one Python imports ...
        str(ROOT / 'executors' / 'shard_merger.py'),  # ... and it finds its executors where the checkout keeps them
    ], from_the_root.stderr


def _venv_with_the_dependencies_but_not_clip_search(path: Path) -> str:
    """A venv that sees this environment's packages (jina, docarray, ...) through a .pth, without its clip_search.

    A .pth line only adds a folder to sys.path: the .pth files inside it (an editable install's finder) do not run.
    """
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True, timeout=120)
    site_packages = next((path / 'lib').glob('python3*/site-packages'))
    folders = [p for p in sys.path if p.endswith('site-packages') and Path(p).is_dir()]
    (site_packages / 'dependencies.pth').write_text('\n'.join(folders) + '\n')
    return str(path / 'bin' / 'python')
