"""Components shared by concurrent generations that keep state while they run, made safe to call from
several threads at once: the tokenizers and the autoencoders.

Every generation of a model copy runs on the same component objects (pipeline copies, task pipelines
from ``from_pipe``), several at once under ``--max-batch``; a stateful component's calls are made whole,
one thread at a time per component.

A fast tokenizer keeps its truncation and padding settings on the one Rust tokenizer it wraps: each call
sets them, then encodes. Two calls at once from two threads can interleave, and one then encodes with
the other's settings. Pipelines make such pairs themselves: Flux's T5 prompt is tokenized padded to 512
tokens, then again padded to the longest only to warn about truncation. A request encoded with another's
padding gets another text length, so another image (and its forwards cannot merge with the others').

A video autoencoder decodes (and encodes) frame by frame through a causal cache it keeps on itself (Wan's
``_feat_map``): two decodes at once overwrite each other's cache, and every frame after the first comes
out wrong.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

__all__ = ["serialize_autoencoders", "serialize_shared_components", "serialize_tokenizers", "tokenizers_of"]

# The methods that set the shared truncation and padding, then encode (transformers 5 has the first, 4 both).
_ENCODING_METHODS = ("_encode_plus", "_batch_encode_plus")
_LOCK_ATTR = "_ditcache_tokenizer_lock"
# The methods of an autoencoder that run its cache from start to end.
_AUTOENCODER_METHODS = ("encode", "decode")
_AUTOENCODER_LOCK_ATTR = "_ditcache_autoencoder_lock"


def serialize_shared_components(pipeline: Any) -> None:
    """Make ``pipeline``'s stateful components (tokenizers, autoencoders) run one call at a time each."""
    serialize_tokenizers(pipeline)
    serialize_autoencoders(pipeline)


def tokenizers_of(pipeline: Any) -> Iterator[Any]:
    """The stateful (fast) tokenizers among ``pipeline``'s components, and those inside its processors."""
    components = getattr(pipeline, "components", None) or {}
    seen: set[int] = set()
    for component in components.values():
        for candidate in (component, getattr(component, "tokenizer", None)):
            if candidate is None or id(candidate) in seen:
                continue
            seen.add(id(candidate))
            if callable(getattr(candidate, "set_truncation_and_padding", None)):
                yield candidate


def serialize_tokenizers(pipeline: Any) -> int:
    """Make each of ``pipeline``'s stateful tokenizers encode for one thread at a time; returns how many
    it guards. A tokenizer guarded already (shared with another pipeline) keeps its one lock."""
    tokenizers = list(tokenizers_of(pipeline))
    for tokenizer in tokenizers:
        _guard(tokenizer, _LOCK_ATTR, _ENCODING_METHODS)
    return len(tokenizers)


def serialize_autoencoders(pipeline: Any) -> int:
    """Make each of ``pipeline``'s autoencoders (a module with ``encode`` and ``decode``) encode and decode
    for one thread at a time; returns how many it guards."""
    components = getattr(pipeline, "components", None) or {}
    autoencoders = [
        component
        for component in components.values()
        if isinstance(component, nn.Module)
        and all(callable(getattr(component, name, None)) for name in _AUTOENCODER_METHODS)
    ]
    for autoencoder in autoencoders:
        _guard(autoencoder, _AUTOENCODER_LOCK_ATTR, _AUTOENCODER_METHODS)
    return len(autoencoders)


def _guard(component: Any, lock_attr: str, methods: tuple[str, ...]) -> None:
    """``component``'s ``methods`` (those it has) made to run one thread at a time, under one lock kept on
    the component as ``lock_attr``; a component guarded already keeps its lock."""
    if lock_attr in component.__dict__:
        return
    lock = threading.RLock()
    component.__dict__[lock_attr] = lock
    for name in methods:
        method = getattr(component, name, None)
        if callable(method):
            component.__dict__[name] = _holding(lock, method)


def _holding(lock: threading.RLock, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return method(*args, **kwargs)

    return locked
