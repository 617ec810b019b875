"""Prepared requests kept across evaluations of the same task, data and tokenizer.

A perturbation sweep evaluates the same tasks once per condition with only the weights
changed; reading, validating and tokenizing the items again for every condition is wasted
work. A task's prepared form (its items and token requests) is a function of the task plan
(whose configuration hash covers the data's content sha256, ``--limit``, the seed and the
options such as ``add_bos_token``) and of the tokenizer, so it is cached under
(task, plan hash, source location, tokenizer object). The tokenizer is held by weak reference:
a different tokenizer object -- even one reusing a freed object's id -- never matches.
The cache keeps the :data:`MAX_ENTRIES` most recently used entries.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from cwa.evaluation.base import TaskPlan

T = TypeVar("T")
MAX_ENTRIES = 8

_CACHE: OrderedDict[tuple[Any, ...], tuple[Any, Any]] = OrderedDict()
_STATS = {"hits": 0, "misses": 0}


def prepared(plan: TaskPlan, tokenizer: Any, build: Callable[[], T]) -> T:
    """``build()``, or the value it returned for this plan and tokenizer before."""
    key = (plan.task, plan.config_hash, plan.source.location, id(tokenizer))
    entry = _CACHE.get(key)
    if entry is not None:
        ref, value = entry
        if ref() is tokenizer:
            _CACHE.move_to_end(key)
            _STATS["hits"] += 1
            return value
        del _CACHE[key]
    _STATS["misses"] += 1
    value = build()
    try:
        ref = weakref.ref(tokenizer)
    except TypeError:  # an object without weak references: do not cache
        return value
    _CACHE[key] = (ref, value)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return value


def cache_stats() -> dict[str, int]:
    """Hits and misses since the process started (or :func:`clear`)."""
    return dict(_STATS)


def clear() -> None:
    _CACHE.clear()
    _STATS["hits"] = _STATS["misses"] = 0
