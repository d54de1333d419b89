"""Loaded by the chapter's Flow in bench/system.py before clip_server's executor module.

clip_server fetches a model's weights by name from its bucket (no network for that here, and no
pretrained weights at all); this hands it the random ViT-B-32 file that ours loads too, named by
``CHAPTER_CLIP_WEIGHTS``. The one change to clip_server, the same as bench/encode.py's.
"""

import os

import clip_server.model.openclip_model as openclip_model

openclip_model.download_model = lambda url, md5sum=None, **kwargs: os.environ['CHAPTER_CLIP_WEIGHTS']
