"""clip-search: text & image search with CLIP, served by a sharded Jina Flow over gRPC."""

from clip_search.client import Client, RequestError

__version__ = '0.1.0'
__all__ = ['Client', 'RequestError', '__version__']
