"""The Flow's executors, one concern each, installed as ``clip_search.executors``.

Import each one by its module (``clip_search.executors.annlite_indexer``): importing one executor
imports nothing of another, so an indexer shard never loads torch.
"""

if __name__ == 'executors':  # the repository folder itself, imported from a checkout's root
    raise ImportError('the executors install as clip_search.executors: import clip_search.executors.<module>')
