"""Deployment: the Dockerfile, the exported docker-compose file and Kubernetes manifests.

No Docker engine runs here, so the compose topology is proven by running each of its services as
a local process with the entrypoint and command the file gives (see ``ComposeProcesses``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from docarray import Document

from clip_search import Client, RequestError
from clip_search.cli import main
from helpers.service import ComposeProcesses
from conftest import ROOT

COMPOSE_FILE = ROOT / 'docker-compose.yml'
K8S_DIR = ROOT / 'deploy' / 'kubernetes'


def option(args: list, name: str, default=None):
    """The value after ``name`` in a command line."""
    args = [str(arg) for arg in args]
    return args[args.index(name) + 1] if name in args else default


def services_running(compose: dict, class_name: str) -> dict:
    return {name: s for name, s in compose['services'].items() if option(s['command'], '--uses') == class_name}


def export(monkeypatch, *args: str) -> None:
    monkeypatch.chdir(ROOT)  # the file's header records the command as given, with the flow path
    assert main(['export', *args]) == 0


def test_the_checked_in_compose_file_is_the_export_of_the_default_flow(tmp_path, monkeypatch):
    export(monkeypatch, 'docker-compose', 'flows/search_flow.yml', '-o', str(tmp_path / 'compose.yml'))
    assert (tmp_path / 'compose.yml').read_text() == COMPOSE_FILE.read_text(), (
        'docker-compose.yml is stale: run `python -m clip_search export docker-compose flows/search_flow.yml`'
    )


def test_each_shard_is_a_service_with_its_shard_id_and_a_volume_of_its_own():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    shards = services_running(compose, 'AnnLiteIndexer')
    assert len(shards) >= 2
    assert sorted(int(option(s['command'], '--shard-id', 0)) for s in shards.values()) == list(range(len(shards)))
    assert {option(s['command'], '--shards') for s in shards.values()} == {str(len(shards))}
    volumes = [s['volumes'] for s in shards.values()]
    assert all(len(v) == 1 for v in volumes) and len({v[0].split(':')[0] for v in volumes}) == len(shards)
    for shard in shards.values():
        name, mount = shard['volumes'][0].split(':')
        assert name in compose['volumes'] and mount == option(shard['command'], '--workspace')


def test_the_compose_flow_keeps_placement_merging_and_the_public_port_of_the_served_one():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose['services']
    head = services['indexer-head']['command']
    (merger,) = services_running(compose, 'ShardMerger').values()
    shard = next(iter(services_running(compose, 'AnnLiteIndexer').values()))
    assert json.loads(option(head, '--polling'))['/index'] == 'ANY' and option(head, '--retries') == '0'
    assert json.loads(option(shard['command'], '--uses-with'))['index_polling'] == 'ANY'  # the shards know it
    gateway = services['gateway']['command']  # clip-search's gateway: an all-or-nothing /update
    assert option(gateway, '--uses') == 'CheckedGRPCGateway' and option(gateway, '--py-modules') == 'clip_search.gateway'
    # the indexer's settings (a limit set there is the merger's too), as in a local Flow
    assert json.loads(option(merger['command'], '--uses-with')) == json.loads(option(shard['command'], '--uses-with'))
    assert option(head, '--uses-after-address') == 'indexer-uses-after:8081'
    (encoder,) = services_running(compose, 'CLIPEncoder').values()
    assert json.loads(option(encoder['command'], '--uses-with'))['name'] == 'ViT-B-32::openai'
    assert encoder['volumes'] == ['models:/models']  # downloaded weights survive a new container
    assert services['gateway']['ports'] == ['61000:61000']
    assert [name for name, s in services.items() if 'ports' in s] == ['gateway']  # executors are not published
    assert {s['image'] for s in services.values()} == {'clip-search:0.1.0'}
    assert all(s['restart'] == 'unless-stopped' for s in services.values())


def test_the_compose_file_is_valid_against_the_compose_specification():
    result = subprocess.run(
        [sys.executable, '-m', 'check_jsonschema', '--builtin-schema', 'vendor.compose-spec', str(COMPOSE_FILE)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kubernetes_manifests_are_the_export_and_keep_each_shard_on_its_own_claim(tmp_path, monkeypatch):
    import kubernetes_validate

    export(monkeypatch, 'kubernetes', 'flows/search_flow.yml', '-o', str(tmp_path))
    exported = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*.yml'))
    assert exported == sorted(p.relative_to(K8S_DIR) for p in K8S_DIR.rglob('*.yml'))
    for path in exported:
        assert (tmp_path / path).read_text() == (K8S_DIR / path).read_text(), f'{path} is stale: export again'
    workloads = {}
    for path in exported:
        for doc in yaml.safe_load_all((K8S_DIR / path).read_text()):
            kubernetes_validate.validate(doc, '1.30.0', strict=True)
            if doc['kind'] in ('Deployment', 'StatefulSet'):
                workloads[doc['metadata']['name']] = doc
    for name in ('indexer-0', 'indexer-1'):
        shard = workloads[name]
        assert shard['kind'] == 'StatefulSet'  # a PersistentVolumeClaim per shard: the index outlives its pod
        (claim,) = shard['spec']['volumeClaimTemplates']
        (container,) = shard['spec']['template']['spec']['containers']
        assert container['volumeMounts'] == [{'name': claim['metadata']['name'], 'mountPath': '/workspace'}]
        assert option(container['args'], '--workspace') == '/workspace' and option(container['args'], '--uses') == 'AnnLiteIndexer'
    assert option(workloads['indexer-1']['spec']['template']['spec']['containers'][0]['args'], '--shard-id') == '1'
    head_containers = {c['name']: c for c in workloads['indexer-head']['spec']['template']['spec']['containers']}
    assert option(head_containers['uses-after']['args'], '--uses') == 'ShardMerger'


@pytest.mark.parametrize(
    'option_given, message',
    [(['--shards', '0'], '--shards must be at least 1'), (['--model', 'no-such-model'], "Unknown model 'no-such-model'")],
)
def test_export_refuses_bad_options_by_name(tmp_path, capsys, option_given, message):
    flow = str(ROOT / 'flows' / 'search_flow.yml')
    assert main(['export', 'docker-compose', flow, *option_given, '-o', str(tmp_path / 'c.yml')]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'c.yml').exists()


def test_the_dockerfile_installs_the_project_from_the_lock_and_serves_61000_as_a_user():
    text = (ROOT / 'Dockerfile').read_text()
    instructions = [line.split(None, 1) for line in re.sub(r'\\\n\s*', ' ', text).splitlines() if line and line[0] != '#']
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == 'FROM') :]
    last = {op: arg for op, arg in final_stage}
    assert last['FROM'].startswith('python:3.11')
    assert any(op == 'RUN' and '-c requirements.lock .' in arg for op, arg in instructions)
    assert last['USER'] not in ('root', '0')
    assert last['EXPOSE'] == '61000' and json.loads(last['ENTRYPOINT']) == ['python', '-m', 'clip_search']
    assert set(json.loads(last['VOLUME'])) == {'/workspace', '/models'} and 'CLIP_SEARCH_CACHE=/models' in last['ENV']
    assert 'grpc://127.0.0.1:61000' in last['HEALTHCHECK']
    for op, arg in instructions:
        if op == 'COPY' and not arg.startswith('--from'):
            assert all((ROOT / path).exists() for path in arg.split()[:-1]), arg


def test_the_dockerfile_build_stage_has_everything_the_package_build_needs(tmp_path):
    """No engine here: build the wheel from exactly the files the build stage copies, as pip would in it."""
    text = (ROOT / 'Dockerfile').read_text()
    build_stage = text.split('\nFROM ')[1]
    (tmp_path / 'context').mkdir()
    for source in re.findall(r'^COPY (?!--from)(.+) \S+$', build_stage, flags=re.M):
        for path in source.split():
            copy = shutil.copytree if (ROOT / path).is_dir() else shutil.copy
            copy(ROOT / path, tmp_path / 'context' / path)
    subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path / 'wheel'), '.'],
        cwd=tmp_path / 'context', check=True, capture_output=True,
    )
    wheel = zipfile.ZipFile(next((tmp_path / 'wheel').glob('*.whl')))
    names = set(wheel.namelist())
    assert {
        'clip_search/flows/search_flow.yml',
        'clip_search/executors/clip_encoder.py',
        'clip_search/demo_model/open_clip_config.json',
        'clip_search/demo_model/open_clip_model.safetensors',
    } <= names
    assert not [name for name in names if name.startswith('executors/')]  # no top-level package to collide with
    assert not [name for name in names if 'testing' in name or 'browser' in name or 'screenshot' in name]


@pytest.mark.slow
@pytest.mark.timeout(300)  # it takes 30 s; a hang fails here, with its traceback, and every process is stopped
def test_the_compose_topology_indexes_and_searches_as_separate_processes(tmp_path, tiny_model, monkeypatch):
    export(monkeypatch, 'docker-compose', 'flows/search_flow.yml', '--model', str(tiny_model), '-o', str(tmp_path / 'compose.yml'))
    services = ComposeProcesses(tmp_path / 'compose.yml', tmp_path / 'run')
    assert len(services.services) == 6  # gateway, encoder, indexer head, 2 shards, merger
    try:
        services.up()  # the gateway starts once every executor's healthcheck passes, as in compose
        client = Client(f'grpc://127.0.0.1:{services.gateway_port}')
        docs = [Document(id=f'doc-{i}', text=f'sentence number {i} about {word}')
                for i, word in enumerate(['apples', 'boats', 'clouds', 'dogs', 'engines', 'forests'] * 3)]  # fmt: skip
        client.index(docs, batch_size=3)  # /index is polled ANY: each request is stored by one shard
        for doc, result in zip(docs, client.search([doc.text for doc in docs], limit=3)):
            assert result.matches[0].id == doc.id
            assert result.matches[0].scores['cosine'].value == pytest.approx(0, abs=1e-4)
            assert len(result.matches) == 3
        with pytest.raises(RequestError, match=re.escape("not indexed: ['unknown'] (use /index); nothing was updated")):
            client.update([Document(id='doc-0', text='changed'), Document(id='unknown', text='new')])  # the gateway's check
        assert client.search([docs[0].text], limit=1)[0].matches[0].text == docs[0].text
        status = client.status()
        assert status['documents'] == len(docs) and status['index']['shards'] == 2
        per_shard = {shard['shard']: shard['documents'] for shard in status['shards']}
        assert set(per_shard) == {0, 1} and all(per_shard.values())  # the requests went to both shards in turn
        for shard in (0, 1):  # each shard wrote its index into its own volume, which records the shard count
            (settings,) = services.volume(f'indexer-{shard}-workspace').rglob('clip_search_index.json')
            assert json.loads(settings.read_text())['shards'] == 2
    finally:
        services.stop()


def test_an_export_with_api_keys_names_secrets_and_holds_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv('CLIP_SEARCH_API_KEYS', 'a-key-that-must-not-be-exported-0001')  # as if the exporting shell had one
    export(monkeypatch, 'docker-compose', 'flows/search_flow.yml', '--api-keys', '-o', str(tmp_path / 'compose.yml'))
    text = (tmp_path / 'compose.yml').read_text()
    assert 'must-not-be-exported' not in text
    compose = yaml.safe_load(text)
    gateway = compose['services']['gateway']
    assert gateway['secrets'] == ['clip_search_api_keys', 'clip_search_read_only_keys']
    assert 'CLIP_SEARCH_API_KEYS_FILE=/run/secrets/clip_search_api_keys' in gateway['environment']
    assert compose['secrets'] == {
        'clip_search_api_keys': {'file': './secrets/api_keys'},
        'clip_search_read_only_keys': {'file': './secrets/read_only_keys'},
    }
    assert not any('secrets' in service for name, service in compose['services'].items() if name != 'gateway')
    assert not any('ports' in service for name, service in compose['services'].items() if name != 'gateway')
    checked = subprocess.run(
        [sys.executable, '-m', 'check_jsonschema', '--builtin-schema', 'vendor.compose-spec', str(tmp_path / 'compose.yml')],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr

    export(monkeypatch, 'kubernetes', 'flows/search_flow.yml', '--api-keys', '-o', str(tmp_path / 'k8s'))
    (deployment,) = [d for d in yaml.safe_load_all((tmp_path / 'k8s' / 'gateway' / 'gateway.yml').read_text()) if d['kind'] == 'Deployment']
    env = {e['name']: e for e in deployment['spec']['template']['spec']['containers'][0]['env']}
    assert env['CLIP_SEARCH_API_KEYS'] == {
        'name': 'CLIP_SEARCH_API_KEYS', 'valueFrom': {'secretKeyRef': {'name': 'clip-search-api-keys', 'key': 'api-keys'}}
    }
    assert env['CLIP_SEARCH_READ_ONLY_KEYS']['valueFrom']['secretKeyRef']['optional'] is True
    assert not any('must-not-be-exported' in p.read_text() for p in (tmp_path / 'k8s').rglob('*.yml'))
    (policy,) = yaml.safe_load_all((tmp_path / 'k8s' / 'network-policy.yml').read_text())
    assert policy['kind'] == 'NetworkPolicy' and policy['spec']['ingress'] == [{'from': [{'podSelector': {}}]}]
