"""The command line and model names: overrides, the index dimension, clear errors at start-up."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import yaml

from clip_search.flowconfig import FlowConfigError, load_flow_config, prepare_flow_config
from clip_search.models import ModelUnavailableError, ensure_weights, resolve_model
from conftest import FLOW_FILE, ROOT

OFFLINE_ENV = {'HF_ENDPOINT': 'http://127.0.0.1:9'}  # nothing listens there: the hub is unreachable


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, '-m', 'clip_search', *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_help_explains_every_option():
    result = run_cli('--help')
    assert result.returncode == 0
    for option in ('--port', '--host', '--model', '--shards', '--workspace'):
        assert option in result.stdout
    assert 'mini::shapes' in result.stdout and 'ViT-B-32::openai' in result.stdout


def test_the_shipped_flow_is_the_chapter_flow():
    config = yaml.safe_load(FLOW_FILE.read_text())
    assert config['with']['port'] == 61000 and config['with']['protocol'] == 'grpc'
    encoder, indexer = config['executors']
    assert (encoder['name'], encoder['uses'], encoder['uses_with']['name']) == ('encoder', 'CLIPEncoder', 'ViT-B-32::openai')
    assert (indexer['name'], indexer['uses'], indexer['workspace']) == ('indexer', 'AnnLiteIndexer', './workspace')
    assert indexer['shards'] > 1 and indexer['uses_after'] == 'ShardMerger'
    assert indexer['polling'] == {'/index': 'ANY', '/search': 'ALL', '/update': 'ALL', '/delete': 'ALL', '/status': 'ALL'}


@pytest.mark.parametrize('polling', ['ANY', 'ALL'])
def test_the_indexer_and_its_merger_are_told_the_polling_of_index(tmp_path, tiny_model, polling):
    config = yaml.safe_load(FLOW_FILE.read_text())
    config['executors'][1]['polling']['/index'] = polling
    flow_file = tmp_path / 'flow.yml'
    flow_file.write_text(yaml.safe_dump(config))
    served = prepare_flow_config(flow_file, model=str(tiny_model))
    assert served['executors'][1]['uses_with']['index_polling'] == polling  # the merger inherits uses_with
    assert served['gateway']['uses'] == 'CheckedGRPCGateway'
    assert served['gateway']['uses_with'] == {'indexer': 'indexer', 'encoder': 'encoder'}  # its direct /search


@pytest.mark.parametrize(
    'change, message',
    [
        ({'/search': 'ANY'}, 'the indexer polls /search ANY: it must be ALL, so that every shard answers (only /index may be ANY)'),
        ({'/index': 'SOME'}, 'the indexer polls /index SOME: expected ANY or ALL'),
    ],
)
def test_a_polling_that_cannot_work_is_refused_by_name(tmp_path, tiny_model, change, message):
    config = yaml.safe_load(FLOW_FILE.read_text())
    config['executors'][1]['polling'].update(change)
    flow_file = tmp_path / 'flow.yml'
    flow_file.write_text(yaml.safe_dump(config))
    with pytest.raises(FlowConfigError, match=re.escape(message)):
        prepare_flow_config(flow_file, model=str(tiny_model))


def test_overrides_and_index_dimension_follow_the_command_line(tiny_model):
    config = prepare_flow_config(FLOW_FILE, port=1234, model=str(tiny_model), shards=5, workspace='/tmp/ws')
    encoder, indexer = config['executors']
    assert config['with']['port'] == 1234
    assert encoder['uses_with']['name'] == str(tiny_model)
    assert (indexer['shards'], indexer['workspace']) == (5, '/tmp/ws')
    assert indexer['uses_with']['n_dim'] == 64  # from the model, never by hand


def test_every_server_of_the_flow_takes_jinas_keepalive_pings_and_the_yamls_options_stay():
    config = load_flow_config(FLOW_FILE)
    tolerant = {'grpc.http2.min_recv_ping_interval_without_data_ms': 5000, 'grpc.http2.max_ping_strikes': 0}
    for section in (config['gateway'], *config['executors']):
        assert tolerant.items() <= section['grpc_server_options'].items()
    assert config['gateway']['grpc_server_options']['grpc.max_receive_message_length'] == 64 << 20  # the YAML's


def test_a_hand_set_dimension_that_disagrees_with_the_model_is_refused(tmp_path, tiny_model):
    config = yaml.safe_load(FLOW_FILE.read_text())
    config['executors'][1]['uses_with']['n_dim'] = 512
    flow_file = tmp_path / 'flow.yml'
    flow_file.write_text(yaml.safe_dump(config))
    with pytest.raises(FlowConfigError, match='n_dim=512.*64-d'):
        prepare_flow_config(flow_file, model=str(tiny_model))
    result = run_cli(str(flow_file), '--model', str(tiny_model))
    assert result.returncode == 2
    assert 'n_dim=512' in result.stderr and 'Traceback' not in result.stderr


def test_a_flow_without_our_executors_is_refused(tmp_path):
    flow_file = tmp_path / 'flow.yml'
    flow_file.write_text('jtype: Flow\nexecutors:\n  - name: x\n    uses: Other\n')
    with pytest.raises(FlowConfigError, match='CLIPEncoder'):
        load_flow_config(flow_file)


def test_clip_server_names_and_open_clip_tags_resolve_without_weights():
    spec = resolve_model('ViT-B-32::openai')
    assert (spec.open_clip_name, spec.pretrained, spec.embed_dim) == ('ViT-B-32', 'openai', 512)
    spec = resolve_model('ViT-L-14::laion2b-s32b-b82k')  # clip-server spelling: dashes
    assert (spec.open_clip_name, spec.pretrained, spec.embed_dim) == ('ViT-L-14', 'laion2b_s32b_b82k', 768)
    assert resolve_model('ViT-B-16-SigLIP::webli').embed_dim == 768  # newer than anything clip-server had
    with pytest.raises(ModelUnavailableError, match='Unknown model'):
        resolve_model('ViT-B-32::no-such-tag')
    with pytest.raises(ModelUnavailableError, match='Unknown model'):
        resolve_model('not-a-model')


def test_a_local_directory_needs_the_hub_layout(tmp_path, tiny_model):
    assert resolve_model(str(tiny_model)).embed_dim == 64
    with pytest.raises(ModelUnavailableError, match='open_clip_config.json'):
        resolve_model(str(tmp_path))
    (tmp_path / 'open_clip_config.json').write_text('{"model_cfg": {"embed_dim": 8}}')
    with pytest.raises(ModelUnavailableError, match='no weights'):
        resolve_model(str(tmp_path))


def test_weights_that_cannot_be_downloaded_fail_fast_with_one_sentence(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, 'ENDPOINT', OFFLINE_ENV['HF_ENDPOINT'])
    monkeypatch.setenv('CLIP_SEARCH_CACHE', '/nonexistent-cache')
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as error:
        ensure_weights(resolve_model('ViT-B-32::openai'))
    assert time.monotonic() - started < 20
    message = str(error.value)
    assert "'ViT-B-32::openai' cannot be downloaded" in message and 'mini::shapes' in message
    assert '\n' not in message


def test_the_cli_reports_missing_weights_in_one_line(tmp_path):
    result = run_cli(
        str(FLOW_FILE), '--model', 'ViT-B-32::openai', '--workspace', str(tmp_path),
        env={**OFFLINE_ENV, 'CLIP_SEARCH_CACHE': str(tmp_path / 'cache')},
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith('clip-search: The weights of ') and '--model' in lines[-1]
    assert 'Traceback' not in result.stderr
    result = run_cli(str(FLOW_FILE), '--model', 'hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K', env=OFFLINE_ENV)
    assert result.returncode == 2 and 'cannot be downloaded' in result.stderr
