"""Test helper, put on a factor collection's PYTHONPATH: after each factor shard is renamed into place,
sleep ``MEMKFAC_TEST_SHARD_DELAY`` seconds, so that a test can stop the collection between shards."""

import os
import re
import time

_DELAY = float(os.environ.get("MEMKFAC_TEST_SHARD_DELAY", "0"))

if _DELAY:
    _replace = os.replace

    def _replace_then_wait(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        if re.fullmatch(r"shard-\d+\.safetensors", os.path.basename(os.fspath(dst))):
            time.sleep(_DELAY)

    os.replace = _replace_then_wait
