"""``--dtype``: int8 serves embeddings within 0.99 cosine of fp32; a dtype the device cannot run is refused at start."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from docarray import Document
from PIL import Image

from clip_search.flowconfig import FlowConfigError, check_encoder_dtype, load_flow_config
from clip_search.models import DtypeError, check_dtype
from conftest import FLOW_FILE, ROOT
from helpers.service import start_service, write_tiny_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'clip_search', *args], capture_output=True, text=True, timeout=180, cwd=ROOT,
        env=dict(os.environ, JINA_HIDE_SURVEY='1'),
    )  # fmt: skip


def flow_with_encoder(tmp_path, **uses_with) -> str:
    config = yaml.safe_load(FLOW_FILE.read_text())
    config['executors'][0]['uses_with'].update(uses_with)
    flow_file = tmp_path / 'flow.yml'
    flow_file.write_text(yaml.safe_dump(config))
    return str(flow_file)


def jpeg(seed: int) -> bytes:
    """A 640x480 photo-like JPEG: a smooth random colour field."""
    small = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((640, 480), Image.BICUBIC).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def test_each_dtype_runs_where_clip_server_runs_it():
    assert (check_dtype(None, 'cpu'), check_dtype(None, 'cuda'), check_dtype(None, 'cuda:1')) == ('fp32', 'fp16', 'fp16')
    assert check_dtype('int8', 'cpu') == 'int8' and check_dtype('fp32', 'cuda') == 'fp32'
    with pytest.raises(DtypeError) as error:
        check_dtype('int8', 'cuda')
    assert str(error.value) == 'dtype int8 cannot run on cuda (it needs cpu): use fp32 or fp16 there.'
    with pytest.raises(DtypeError, match="dtype 'bf16' is unknown: use one of fp32, fp16, int8"):
        check_dtype('bf16', 'cpu')


def test_the_command_line_sets_the_encoder_dtype_and_the_yaml_is_checked(tmp_path):
    config = load_flow_config(FLOW_FILE, dtype='int8')
    assert config['executors'][0]['uses_with']['dtype'] == 'int8'
    check_encoder_dtype(config)  # int8 on this CPU: accepted
    with pytest.raises(FlowConfigError, match="the encoder's dtype 'bf16' is unknown"):
        load_flow_config(flow_with_encoder(tmp_path, dtype='bf16'))


def test_fp16_on_a_cpu_is_refused_before_anything_starts(tmp_path, tiny_model):
    flow_file = flow_with_encoder(tmp_path, device='cpu')
    result = run_cli(flow_file, '--model', str(tiny_model), '--dtype', 'fp16', '--workspace', str(tmp_path / 'ws'))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'clip-search: dtype fp16 cannot run on cpu (it needs cuda): use fp32 or int8 there.'
    ]
    assert not (tmp_path / 'ws').exists()


@pytest.fixture(scope='module')
def vit_b_32(tmp_path_factory):
    """open_clip's ViT-B-32 with random weights, in the hub layout."""
    import open_clip

    return write_tiny_model(tmp_path_factory.mktemp('vit_b_32'), model_cfg=open_clip.get_model_config('ViT-B-32'))


@pytest.mark.slow
def test_int8_embeddings_of_a_vit_b_32_stay_within_0_99_cosine_of_fp32(tmp_path, vit_b_32):
    docs = [Document(blob=jpeg(seed), mime_type='image/jpeg') for seed in range(8)]
    docs += [Document(text=text) for text in ('a photo of a dog', 'two people walking along a beach at sunset', 'red')]
    embeddings = {}
    for dtype in ('fp32', 'int8'):
        service = start_service(vit_b_32, tmp_path / dtype, shards=1, extra_args=('--dtype', dtype), ready_timeout=600)
        try:
            embeddings[dtype] = service.client().encode(docs).embeddings
            assert f'dtype {dtype} on cpu: loaded' in service.log()
        finally:
            service.stop()
    cosines = np.sum(embeddings['fp32'] * embeddings['int8'], axis=1)
    assert cosines.min() >= 0.99, cosines
    assert cosines.min() < 1.0  # int8 really ran: not the fp32 model twice


def test_linear_self_attention_computes_what_multihead_attention_computes():
    import torch

    from clip_search.quantize import LinearSelfAttention

    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 64)
    causal = torch.full((10, 10), float('-inf')).triu(1)  # open_clip's text mask
    linear = LinearSelfAttention(attention)
    with torch.inference_mode():
        for mask in (None, causal):
            expected = attention(x, x, x, need_weights=False, attn_mask=mask)[0]
            assert torch.allclose(linear(x, x, x, need_weights=False, attn_mask=mask)[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match='self-attention only'):
        linear(x, torch.randn(3, 10, 64), x)


def test_int8_quantizes_the_attention_projections_and_keeps_each_first_block_in_fp32():
    import open_clip
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    from clip_search.quantize import quantize_int8
    from helpers.service import TINY_MODEL_CFG

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_MODEL_CFG).eval()
    images, tokens = torch.randn(4, 3, 32, 32), open_clip.tokenize(['a red circle', 'two blue squares'], context_length=16)
    with torch.inference_mode():
        fp32 = model.encode_image(images), model.encode_text(tokens)
        int8_model = quantize_int8(model)
        int8 = int8_model.encode_image(images), int8_model.encode_text(tokens)
    for tower in ('visual.transformer', 'transformer'):
        first, second = (int8_model.get_submodule(f'{tower}.resblocks.{i}') for i in (0, 1))
        assert type(first.attn.in_proj) is torch.nn.Linear and type(first.mlp.c_fc) is torch.nn.Linear
        assert all(isinstance(layer, Int8Linear) for layer in (second.attn.in_proj, second.attn.out_proj, second.mlp.c_fc, second.mlp.c_proj))
    for a, b in zip(fp32, int8):
        cosines = torch.nn.functional.cosine_similarity(a, b)
        assert cosines.min() >= 0.99 and not torch.equal(a, b), cosines


def test_the_encoder_runs_one_forward_pass_at_a_time(tiny_model):
    """Concurrent requests' passes side by side would oversubscribe the cores torch already spreads one over."""
    import threading
    import time

    from docarray import DocumentArray

    from clip_search.executors.clip_encoder import CLIPEncoder

    encoder = CLIPEncoder(name=str(tiny_model), max_concurrent_requests=4)
    running, most = [0], [0]
    lock = threading.Lock()
    encode_text = encoder._encode_text

    def counting_encode_text(tokens):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return encode_text(tokens)
        finally:
            with lock:
                running[0] -= 1

    encoder._encode_text = counting_encode_text
    threads = [threading.Thread(target=encoder.embed, args=(DocumentArray([Document(text=f'text {i}')]),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    encoder.close()
    assert most[0] == 1

