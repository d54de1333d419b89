"""The Flow YAML of clip-as-service's search chapter, verbatim (tests/fixtures/chapter/, see its README).

Both of Jina's syntaxes: ``uses: {jtype:, with:, metas:}`` with ``workspace`` inside ``uses`` or
beside it, and ``uses: CLASS`` + ``uses_with``; clip-as-service's executor modules are served by ours.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from docarray import Document

from clip_search.flowconfig import CARD_POLLING, FlowConfigError, load_flow_config, prepare_flow_config
from helpers.service import start_service, write_tiny_model

CHAPTER = Path(__file__).resolve().parent / 'fixtures' / 'chapter'
SNIPPETS = sorted(CHAPTER.glob('*.yml'))
OWN_MODULES = {
    'CLIPEncoder': ['clip_search.executors.clip_encoder'],
    'AnnLiteIndexer': ['clip_search.executors.annlite_indexer', 'clip_search.executors.shard_merger'],
}


@pytest.fixture(scope='module')
def model_512(tmp_path_factory) -> Path:
    """A tiny random model with the chapter's 512-d embeddings (its YAML sets n_dim: 512)."""
    from helpers.service import TINY_MODEL_CFG

    return write_tiny_model(tmp_path_factory.mktemp('model_512'), model_cfg={**TINY_MODEL_CFG, 'embed_dim': 512})


def test_the_fixtures_are_the_chapters_three_snippets_of_each_version():
    names = [path.stem for path in SNIPPETS]
    assert names == sorted(f'{version}_{part}' for version in ('clip_search', 'text_image_search') for part in ('indexer_tab', 'model_tab', 'sharded'))
    for path in SNIPPETS:
        modules = [e['uses']['metas']['py_modules'] for e in yaml.safe_load(path.read_text())['executors']]
        assert modules == [['clip_server.executors.clip_torch'], ['annlite.executor']]  # as printed, upstream's


@pytest.mark.parametrize('snippet', SNIPPETS, ids=[path.stem for path in SNIPPETS])
def test_each_chapter_snippet_reads_as_our_flow(snippet, capsys):
    printed = yaml.safe_load(snippet.read_text())['executors'][1]
    config = load_flow_config(snippet)
    encoder, indexer = config['executors']
    assert (encoder['uses'], encoder['py_modules']) == ('CLIPEncoder', OWN_MODULES['CLIPEncoder'])
    assert (indexer['uses'], indexer['py_modules']) == ('AnnLiteIndexer', OWN_MODULES['AnnLiteIndexer'])
    assert indexer['uses_with'].items() >= printed['uses']['with'].items()  # the user's settings, kept: n_dim 512 (and limit 10)
    assert indexer['workspace'] == './workspace'  # inside uses or beside it
    assert indexer['uses_after'] == 'ShardMerger'
    assert indexer.get('shards', 1) == printed.get('shards', 1)
    assert indexer['polling'] == CARD_POLLING  # the chapter's own where it gives one, else the card's
    assert capsys.readouterr().err == (
        f"clip-search: {snippet.name} names clip-as-service's clip_server.executors.clip_torch.CLIPEncoder and "
        f"annlite.executor.AnnLiteIndexer: clip-search's own serve them\n"
    )


def test_the_command_line_still_overrides_and_n_dim_is_still_checked(tiny_model, model_512):
    sharded = CHAPTER / 'text_image_search_sharded.yml'
    config = prepare_flow_config(sharded, port=4321, model=str(model_512), workspace='/tmp/elsewhere')
    encoder, indexer = config['executors']
    assert config['with']['port'] == 4321 and encoder['uses_with']['name'] == str(model_512)
    assert (indexer['workspace'], indexer['uses_with']['n_dim'], indexer['shards']) == ('/tmp/elsewhere', 512, 5)
    with pytest.raises(FlowConfigError, match=r'n_dim=512, but model .* makes 64-d embeddings'):
        prepare_flow_config(sharded, model=str(tiny_model))


def test_the_other_syntax_with_upstream_modules_and_settings_beside_uses(tmp_path):
    flow_file = tmp_path / 'flow.yml'
    flow_file.write_text(
        'jtype: Flow\n'
        'executors:\n'
        '  - name: encoder\n'
        '    uses: CLIPEncoder\n'
        '    py_modules: [clip_server.executors.clip_torch]\n'
        '    uses_with: {name: mini::shapes}\n'
        '  - name: indexer\n'
        '    uses: {jtype: AnnLiteIndexer, with: {n_dim: 128, limit: 5}, metas: {py_modules: [annlite.executor]}}\n'
        '    uses_with: {limit: 7}\n'
        '    workspace: ./beside\n'
        '    shards: 2\n'
        '    polling: {/search: ALL}\n'
    )
    encoder, indexer = load_flow_config(flow_file)['executors']
    assert (encoder['uses'], encoder['py_modules'], encoder['uses_with']) == (
        'CLIPEncoder', OWN_MODULES['CLIPEncoder'], {'name': 'mini::shapes'}
    )
    assert indexer['uses_with'].items() >= {'n_dim': 128, 'limit': 7}.items()  # uses_with wins over uses.with, as in Jina
    assert indexer['workspace'] == './beside' and indexer['polling'] == CARD_POLLING


@pytest.mark.slow
def test_the_chapters_sharded_flow_served_verbatim_with_clip_client(tmp_path, model_512):
    """The outside check: the chapter's YAML as printed, 5 shards, the unmodified clip_client."""
    from clip_client import Client as ChapterClient

    flow_file = tmp_path / 'chapter_flow.yml'
    flow_file.write_bytes((CHAPTER / 'text_image_search_sharded.yml').read_bytes())
    texts = [f'chapter sentence {i} about {w}' for i, w in enumerate(['tea', 'hills', 'boats', 'clocks'] * 25)]
    workspace = tmp_path / 'workspace'
    service = start_service(model_512, workspace, shards=5, flow_file=flow_file)
    try:
        assert "names clip-as-service's clip_server.executors.clip_torch.CLIPEncoder" in service.log()
        clip_client = ChapterClient(service.address)
        clip_client.index([Document(id=f'c{i}', text=t) for i, t in enumerate(texts)], batch_size=10)  # 10 requests
        check_every_text_finds_itself(clip_client, texts, range(100))
        status = service.client().status()
        assert status['documents'] == 100 and sum(s['documents'] > 0 for s in status['shards']) >= 3
        deleted = [f'c{i}' for i in range(0, 100, 10)]
        assert sorted(service.client().delete(deleted)) == sorted(deleted)
        kept = [i for i in range(100) if f'c{i}' not in deleted]
        check_every_text_finds_itself(clip_client, texts, kept)
    finally:
        service.stop()
    service = start_service(model_512, workspace, shards=5, flow_file=flow_file)  # all of it holds after a restart
    try:
        assert service.client().status()['documents'] == 90
        check_every_text_finds_itself(ChapterClient(service.address), texts, kept)
    finally:
        service.stop()


def check_every_text_finds_itself(clip_client, texts: list[str], indexed) -> None:
    indexed = list(indexed)
    results = clip_client.search([texts[i] for i in indexed], limit=10)
    live = {f'c{i}' for i in indexed}
    for i, result in zip(indexed, results):
        ids = list(result.matches[:, 'id'])
        distances = [m.scores['cosine'].value for m in result.matches]
        assert ids[0] == f'c{i}' and len(ids) == 10 == len(set(ids)) and set(ids) <= live
        assert distances == sorted(distances)
