"""Verified search: the model checks the embedding search's top hits from their stored tokens.

A cosine score cannot say "this is not it": over any gallery the nearest image scores about as high
as a true match. Every stored image here can *answer*, so ``search(..., verify=N)`` asks pass 2 of
each of the top N hits whether it shows the query (``Fwd2Bot.relevance``: P(yes) from one prefill,
no image decode, no vision tower), re-ranks them by that relevance, and with ``min_relevance`` drops
the hits below it; no hit left is the honest "no good match".

The rules, one place for the CLI, the REST route and the evaluation:

- the embedding search (filter, ``min_score``) yields the top ``max(N, offset + k)`` candidates; the
  first N get a relevance and are ordered by it (ties keep the embedding order), any others follow in
  embedding order with ``relevance`` None; the page is ``[offset:offset + k]`` of that order;
- ``min_relevance`` keeps only verified hits with relevance >= it (an unverified hit cannot pass);
  ``dropped`` counts the verified ones it removed;
- every hit keeps its cosine ``score`` (the contract) and gains ``relevance``.

The default cutoff, 0.5, is where the model says "yes" more than "no": the raw probability's own
decision point, used as is by stock checkpoints; a checkpoint that carries a calibration (temperature
and bias fitted on held-out scenes, ``config.relevance_calibration``) moves its probabilities, not
the cutoff. No torch at import time: the shells check options with this module before a model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .collection import Hit
from .options import OptionError
from .service_view import ServiceView

#: the most hits one search may verify (one pass-2 prefill each; ~N x the cost of a question's prefill)
MAX_VERIFY = 100
#: the cutoff the page and the docs use: P(yes) above P(no)
DEFAULT_MIN_RELEVANCE = 0.5
#: how many hits the search page verifies by default (its page of results)
PAGE_VERIFY = 20


@dataclass(frozen=True)
class VerifiedHit(Hit):
    """A hit with the model's P(yes) that it shows the query (None: beyond the verified top N)."""

    relevance: float | None = None


class VerifiedHits(list):
    """The hits of a verified search, plus what the verification did (for the CLI's stderr line and
    the REST body): ``verified`` hits were asked, ``dropped`` were cut by ``min_relevance``."""

    def __init__(self, hits: Sequence[VerifiedHit] = (), verified: int = 0, dropped: int = 0,
                 min_relevance: float | None = None) -> None:
        super().__init__(hits)
        self.verified, self.dropped, self.min_relevance = verified, dropped, min_relevance


def check_verify(verify: int | None, min_relevance: float | None, text: bool = True) -> None:
    """Refuse, in one line and before a model loads, what a verified search cannot do."""
    if verify is None:
        if min_relevance is not None:
            raise OptionError("--min-relevance needs --verify N (the relevance comes from verifying the top N hits), "
                              f"e.g. --verify 20 --min-relevance {DEFAULT_MIN_RELEVANCE}")
        return
    if isinstance(verify, bool) or not isinstance(verify, (int, np.integer)) or not 1 <= verify <= MAX_VERIFY:
        raise OptionError(f"--verify {verify!r}: give how many top hits to verify, 1 to {MAX_VERIFY}")
    if min_relevance is not None and not 0.0 <= float(min_relevance) <= 1.0:
        raise OptionError(f"--min-relevance {min_relevance!r}: give a probability between 0 and 1 "
                          f"(default cutoff {DEFAULT_MIN_RELEVANCE})")
    if not text:
        raise OptionError("--verify needs a text query: it asks the model whether each hit shows that text "
                          "(an example image or --like has no words to check)")


def candidate_count(verify: int, k: int, offset: int) -> int:
    """How many embedding hits a verified search takes: the N to verify, and enough for the page."""
    return max(int(verify), int(offset) + int(k))


def rerank(hits: Sequence[Hit], relevance: Sequence[float], k: int, offset: int = 0,
           min_relevance: float | None = None) -> VerifiedHits:
    """Order ``hits`` (embedding order, the first ``len(relevance)`` verified) by relevance, cut and page
    them as the module docstring says."""
    n = len(relevance)
    verified = [VerifiedHit(h.id, h.path, h.score, h.metadata, float(r)) for h, r in zip(hits[:n], relevance)]
    order = sorted(range(n), key=lambda i: -verified[i].relevance)  # stable: ties keep the embedding order
    ranked = [verified[i] for i in order]
    rest = [VerifiedHit(h.id, h.path, h.score, h.metadata, None) for h in hits[n:]]
    dropped = 0
    if min_relevance is not None:
        kept = [h for h in ranked if h.relevance >= min_relevance]
        dropped, ranked, rest = len(ranked) - len(kept), kept, []
    page = (ranked + rest)[offset:offset + k]
    return VerifiedHits(page, verified=n, dropped=dropped, min_relevance=min_relevance)


def refusal(service: ServiceView) -> str | None:
    """Why ``service``'s collection cannot verify hits (None: it can): verification needs stored tokens
    and a model that answers from them, which an embedding-only collection or model does not have."""
    manifest = service.collection.manifest
    if not manifest.token_count or manifest.strategy.get("tokens") not in ("fwd2bot", "pool", "full"):
        return (f"the collection {service.collection.path} stores no tokens to answer from (embedding-only): "
                "search without --verify")
    if not callable(getattr(service.model, "relevance", None)):
        return (f"the model of {service.collection.path} cannot answer from stored tokens (embedding-only): "
                "search without --verify")
    return None


def verify_by_default(model: Any) -> bool:
    """Whether a search that does not say should verify with ``model``: yes unless the model declares that
    re-ranking by its relevance was measured not to help (``config.relevance_ranks_well`` False: a model whose
    P(yes) lowered R@1 on its own held-out scenes, as earlier demo models' did). Unmeasured models (stock
    checkpoints) verify."""
    return getattr(getattr(model, "config", None), "relevance_ranks_well", None) is not False


def verify_hits(service: ServiceView, text: str, hits: Sequence[Hit], verify: int) -> np.ndarray:
    """P(yes) for the first ``verify`` of ``hits`` from their stored tokens (one relevance call)."""
    head = list(hits[:verify])
    if not head:
        return np.zeros(0)
    tokens = service.collection.get_tokens_batch([h.id for h in head])
    return np.asarray(service.model.relevance(list(tokens), [text] * len(head), kind=service.strategy.tokens))


def verified_search(service: ServiceView, text: str, k: int, filter: dict | None = None, offset: int = 0,
                    min_score: float | None = None, verify: int = PAGE_VERIFY,
                    min_relevance: float | None = None) -> VerifiedHits:
    """``service.search`` by text, verified (see the module docstring)."""
    from .errors import ServiceError  # lazily: the shells import this module to check options, before images

    check_verify(verify, min_relevance)
    reason = refusal(service)
    if reason:
        raise ServiceError(reason)
    query = service.query_vector(text=text)
    hits = service.collection.search(query, k=candidate_count(verify, k, offset), filter=filter, offset=0,
                                     min_score=min_score)
    return rerank(hits, verify_hits(service, text, hits, verify), k, offset, min_relevance)
