"""The Flow's executors, one concern each: encode, index one shard, merge the shards' answers."""

from executors.annlite_indexer import AnnLiteIndexer
from executors.clip_encoder import CLIPEncoder
from executors.shard_merger import ShardMerger

__all__ = ['CLIPEncoder', 'AnnLiteIndexer', 'ShardMerger']
