"""Token budgets of a collection, where model and collection meet (issue 24).

A nested compressor (``f2b train --nested 4,8,16,32``) stores any of its budgets: ``f2b index --tokens k``
builds a collection at k tokens per image, and ``f2b migrate --tokens k`` shrinks an existing one in place
without re-encoding a single image: the stored tokens are truncated to their first k and the embeddings
recomputed from them by the model's contrastive head (``Fwd2Bot.embed_stored``: no image decode, no
vision tower, no LLM). The crash-safe rewrite itself is the collection's (``collection.shrink``); this
module checks the request against the model and hands it the head.

The recomputed embeddings are the head over the *stored* tokens (fp16, or int8), while indexing from
scratch runs the head over the fp32 tokens before they are stored: the two agree up to that rounding
(cosine > 0.9999 on the tiny models; tested), not bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

from .collection.errors import CollectionError, CollectionMismatchError
from .service_view import ServiceView  # the facade's shape, not the facade: ``service`` imports this module


class BudgetError(CollectionError):
    """A token budget the collection or its model cannot serve (one line, shown as is)."""


def check_index_tokens(service: ServiceView, tokens: int | None) -> None:
    """``f2b index --tokens k`` on an existing collection: k must be what it stores."""
    if tokens is None:
        return
    manifest = service.collection.manifest
    if manifest.strategy.get("tokens") != "fwd2bot":
        raise BudgetError(f"--tokens chooses how many summary tokens a fwd2bot collection stores; {service.collection.path} "
                          f"stores {manifest.strategy.get('tokens')} tokens (use --strategy pool@N for pooled tokens)")
    if tokens != manifest.token_count:
        raise CollectionMismatchError(
            f"the collection {service.collection.path} stores {manifest.token_count} summary tokens per image, not "
            f"{tokens}; shrink it with f2b migrate --tokens {tokens} (no re-encoding), or re-encode with --reindex")


def migrate_tokens(service: ServiceView, tokens: int,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Shrink ``service``'s collection to ``tokens`` summary tokens per image (see the module docstring).
    Refuses, in one line, a collection that does not store fwd2bot summary tokens, a budget its model was
    not trained for, and growing (the dropped tokens are gone: that needs --reindex)."""
    from .collection.shrink import shrink_tokens

    collection = service.collection
    manifest = collection.manifest
    have = manifest.strategy
    if have.get("tokens") != "fwd2bot":
        raise BudgetError(f"--tokens shrinks stored fwd2bot summary tokens; {collection.path} stores "
                          f"{have.get('tokens')} tokens (strategy {have}); re-index with --strategy pool@N instead")
    if tokens > manifest.token_count:
        raise BudgetError(f"the collection {collection.path} stores {manifest.token_count} summary tokens per image; "
                          f"growing it to {tokens} needs the images again: f2b index --reindex --tokens {tokens}")
    model = service.model  # loaded and checked against the collection's fingerprint
    from .model.budgets import check_budget

    check_budget(model.config, tokens, model.source)
    strategy = {**have, "budget": tokens}
    embed_stored = model.embed_stored
    if have.get("embed") == "fwd2bot":
        def embed(stored):
            return embed_stored(stored, tokens)
    else:  # the prompt embedding does not read the summary tokens: keep it
        embed = None
    report = shrink_tokens(collection, tokens, strategy, embed, progress=progress)
    report["bytes_per_image"] = collection.info().get("bytes_per_image")
    return report


def with_tokens(model: Any, strategy: Any, tokens: int | None) -> Any:
    """A new collection's strategy at ``tokens`` summary tokens per image (``f2b index --tokens k``),
    checked against the budgets the model was trained for."""
    if tokens is None:
        return strategy
    if strategy.tokens != "fwd2bot":
        raise BudgetError(f"--tokens chooses how many summary tokens the fwd2bot strategy stores, but the strategy is "
                          f"{strategy.name!r}; use --strategy pool@N to choose pooled tokens")
    return model.resolve_strategy(type(strategy)(strategy.embed, "fwd2bot", tokens))
