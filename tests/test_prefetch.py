"""A stream at its prefetch limit sleeps until an answer comes (clip_search/prefetch.py), as the
gateway and the client stream requests during bulk indexing."""

import asyncio
import time

from jina.serve.stream import RequestStreamer
from jina.types.request.data import DataRequest

from clip_search import prefetch


def stream_slow_answers(requests: int, limit: int, seconds_each: float) -> tuple[list[str], int, float]:
    """Stream requests through Jina's RequestStreamer to a handler that answers each after
    ``seconds_each``: the answers' ids in order, the most requests in flight, and the CPU seconds used."""
    in_flight = most = 0

    async def answer_later(request: DataRequest) -> DataRequest:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(seconds_each)
        in_flight -= 1
        return request

    def handle(request: DataRequest, return_type=None):
        return asyncio.ensure_future(answer_later(request)), None

    async def run() -> list[str]:
        streamer = RequestStreamer(request_handler=handle, result_handler=lambda response: response, prefetch=limit)
        outgoing = []
        for i in range(requests):
            request = DataRequest()
            request.header.request_id = f'r{i}'
            outgoing.append(request)
        return [answer.header.request_id async for answer in streamer.stream(iter(outgoing), results_in_order=True)]

    cpu_started = time.process_time()
    answered = asyncio.run(run())
    return answered, most, time.process_time() - cpu_started


def test_a_stream_at_its_prefetch_limit_waits_without_spinning_and_keeps_the_limit_and_order():
    prefetch.install()
    answered, most, cpu_seconds = stream_slow_answers(requests=6, limit=2, seconds_each=0.3)  # 0.9 s of waiting
    assert answered == [f'r{i}' for i in range(6)]
    assert most == 2
    # Jina's own wait (`await asyncio.sleep(0)` in a loop) spins a core the whole 0.9 s
    assert cpu_seconds < 0.3, f'the stream used {cpu_seconds:.2f} s of CPU while it waited'


def jinas_own_iterator() -> None:
    import jina.serve.stream
    from jina.serve.stream import helper

    jina.serve.stream.AsyncRequestsIterator = helper.AsyncRequestsIterator


def test_the_client_installs_the_waiting_prefetch():
    import jina.serve.stream

    from clip_search import Client

    jinas_own_iterator()
    Client('grpc://localhost:1')  # nothing is contacted before a call
    assert jina.serve.stream.AsyncRequestsIterator is prefetch.WaitingRequestsIterator


def test_the_gateway_installs_the_waiting_prefetch():
    import jina.serve.stream

    from clip_search.gateway import _UpdateCheck

    class Base:  # stands in for Jina's gateway class, which needs a running Flow's arguments
        def __init__(self, **kwargs):
            pass

    class Gateway(_UpdateCheck, Base):
        pass

    jinas_own_iterator()
    Gateway(indexer='indexer')
    assert jina.serve.stream.AsyncRequestsIterator is prefetch.WaitingRequestsIterator
