"""The layout the design promises: one package, executors that import only what they need, no circles."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(code: str, cwd: Path) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    result = subprocess.run(
        [sys.executable, '-c', f'{code}\nimport sys\nprint(" ".join(sys.modules))'],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return set(result.stdout.split())


@pytest.mark.parametrize('module', ['clip_search.executors.annlite_indexer', 'clip_search.executors.shard_merger'])
def test_a_shard_or_the_merger_does_not_load_torch(module, tmp_path):
    loaded = imported_modules(f'import {module}', cwd=tmp_path)
    assert module in loaded
    assert not {'torch', 'open_clip', 'clip_search.executors.clip_encoder'} & loaded


def test_the_cli_process_does_not_load_torch(tmp_path):
    loaded = imported_modules('import clip_search.cli, clip_search.deploy, clip_search.web.app', cwd=tmp_path)
    assert 'clip_search.cli' in loaded and not {'torch', 'open_clip'} & loaded


@pytest.mark.parametrize('where', ['elsewhere', 'the repository root'])
def test_there_is_no_top_level_executors_package(where, tmp_path):
    cwd = tmp_path if where == 'elsewhere' else ROOT
    result = subprocess.run([sys.executable, '-c', 'import executors'], cwd=cwd, capture_output=True, text=True)
    assert result.returncode != 0
    assert ('ModuleNotFoundError' if where == 'elsewhere' else 'install as clip_search.executors') in result.stderr


def test_the_shipped_flow_names_the_installed_executor_modules():
    text = (ROOT / 'flows' / 'search_flow.yml').read_text()
    assert 'clip_search.executors.clip_encoder' in text and '- executors.' not in text


def test_serving_and_exporting_share_the_flow_loading_and_do_not_import_each_other():
    def imports(path: str) -> set[str]:
        tree = ast.parse((ROOT / path).read_text())
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        return names | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}

    cli, deploy = imports('clip_search/cli.py'), imports('clip_search/deploy.py')
    assert 'clip_search.deploy' in cli  # `export` is a subcommand of the CLI
    assert 'clip_search.cli' not in deploy
    assert 'clip_search.flowconfig' in cli and 'clip_search.flowconfig' in deploy


def test_the_runtime_package_holds_no_test_kit():
    package = ROOT / 'clip_search'
    assert not (package / 'testing.py').exists()
    assert not (package / 'web' / 'browser.py').exists() and not (package / 'web' / 'screenshot.py').exists()
    runtime = [p for p in package.rglob('*.py') if 'demo_model' not in p.parts]
    assert not [p for p in runtime if 'helpers.' in p.read_text() or 'import pytest' in p.read_text()]
