"""The README never lies: CI runs its test command, and its files and commands exist."""

from __future__ import annotations

import re

import yaml

from conftest import ROOT

README = (ROOT / 'README.md').read_text()


def bash_blocks() -> list[str]:
    return re.findall(r'```bash\n(.*?)```', README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(line for block in bash_blocks() for line in block.splitlines() if 'pytest' in line)
    ci_lines = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert test_command in ci_lines


def test_the_quick_start_installs_from_the_lock_and_serves_the_bundled_model():
    quick_start = bash_blocks()[0].strip()
    assert 'pip install -c requirements.lock' in quick_start
    assert quick_start.endswith('python -m clip_search flows/search_flow.yml --model mini::shapes')
    assert (ROOT / 'requirements.lock').exists() and (ROOT / 'flows' / 'search_flow.yml').exists()


def test_the_flow_shown_in_the_readme_matches_the_shipped_one():
    shown = yaml.safe_load(re.search(r'```yaml\n(jtype: Flow.*?)```', README, flags=re.S).group(1))
    shipped = yaml.safe_load((ROOT / 'flows' / 'search_flow.yml').read_text())
    assert shown['with'] == shipped['with'] and shown['gateway'] == shipped['gateway']
    for shown_executor, shipped_executor in zip(shown['executors'], shipped['executors']):
        for key in ('name', 'uses', 'uses_with', 'py_modules', 'polling', 'uses_after', 'shards', 'workspace'):
            assert shown_executor.get(key) == shipped_executor.get(key), key


def test_the_lock_pins_every_package_exactly():
    pins = [line.split('#')[0].strip() for line in (ROOT / 'requirements.lock').read_text().splitlines()]
    pins = [p for p in pins if p]
    assert len(pins) > 100 and all(re.fullmatch(r'[A-Za-z0-9_.\-\[\]]+==[^\s=]+', p) for p in pins)
    for package in ('jina==3.27.20', 'docarray==0.21.0', 'annlite==0.5.10', 'open-clip-torch==3.3.0', 'torch==2.14.1', 'clip-client==0.8.3'):
        assert package in pins
    assert any(p.startswith('protobuf==4.25.') for p in pins) and any(p.startswith('numpy==1.') for p in pins)

