"""clip-search: text & image search with CLIP, served by a sharded Jina Flow over gRPC."""

import warnings

# jina imports its hub SDK, which imports setuptools' pkg_resources: a deprecation warning nobody here can act on
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

from clip_search.client import Client, RequestError  # noqa: E402  (after the filter: it imports jina)

__version__ = '0.1.0'
__all__ = ['Client', 'RequestError', '__version__']
