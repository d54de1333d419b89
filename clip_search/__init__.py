"""clip-search: text & image search with CLIP, served by a sharded Jina Flow over gRPC."""

from clip_search.client import Client

__version__ = '0.1.0'
__all__ = ['Client', '__version__']
