"""clip-search: text & image search with CLIP, served by a sharded Jina Flow over gRPC."""

import warnings

# jina imports its hub SDK, which imports setuptools' pkg_resources: a deprecation warning nobody here can act on
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

__version__ = '0.1.0'
__all__ = ['Client', 'RequestError', '__version__']


def __getattr__(name: str):
    """``Client`` and ``RequestError`` on first use: ``python -m clip_search`` imports jina under its own Ctrl-C handling."""
    if name in ('Client', 'RequestError'):
        from clip_search import client

        return getattr(client, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
