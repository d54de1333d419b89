"""clip-search: text & image search with CLIP, served by a sharded Jina Flow over gRPC."""

import warnings

# jina imports its hub SDK, which imports setuptools' pkg_resources: a deprecation warning nobody here can act on
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

__version__ = '0.1.0'


def _executors_beside_a_checkout() -> None:
    """In a checkout, find ``clip_search.executors`` where the repository keeps it: ``executors/``.

    A wheel installs ``executors/`` inside the package (pyproject's package-dir), an editable install
    maps it; but ``python -m clip_search`` run from the repository root imports the checkout's
    ``clip_search/`` first (``python -m`` puts the current directory first), even when a wheel is
    installed, and that copy has no ``executors/`` inside: every executor failed to load.
    """
    import importlib.util
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parent
    folder = package.parent / 'executors'
    if (package / 'executors').is_dir() or not (folder / 'clip_encoder.py').is_file():
        return  # an installed package, or not a checkout
    if importlib.util.find_spec(f'{__name__}.executors') is not None:
        return  # an editable install maps it
    spec = importlib.util.spec_from_file_location(
        f'{__name__}.executors', folder / '__init__.py', submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_executors_beside_a_checkout()
__all__ = ['Client', 'RequestError', '__version__']


def __getattr__(name: str):
    """``Client`` and ``RequestError`` on first use: ``python -m clip_search`` imports jina under its own Ctrl-C handling."""
    if name in ('Client', 'RequestError'):
        from clip_search import client

        return getattr(client, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
