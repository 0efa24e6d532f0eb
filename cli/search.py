"""`f2b search`: text, example image or stored image, optionally verified by the model (--verify). Thin over the
service; a running `f2b serve` of the collection answers text and --like ID searches."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .commands import _answered_by, _parse_filters, _service, user_errors, world_warning
from .main import CollectionOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, app, check, collection_path, err, fail, print_json


@app.command()
def search(
    text: Optional[str] = typer.Argument(None, help="Text query."),
    image: Optional[Path] = typer.Option(None, "--image", help="Search by example image."),
    like: Optional[str] = typer.Option(None, "--like", help="More like this indexed image (id or path)."),
    collection: Optional[Path] = CollectionOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    k: int = typer.Option(10, "--limit", "-k", min=1, help="Number of results."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many results (pagination)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop results below this cosine score."),
    filters: Optional[List[str]] = typer.Option(None, "--filter", help="key=value metadata filter (repeatable; key>=v, key<=v)."),
    verify: Optional[int] = typer.Option(
        None, "--verify", help="Verify the top N hits (1-100): the model checks each from its stored tokens "
        "and they are re-ranked by its P(yes) ('relevance'). Text queries only."),
    min_relevance: Optional[float] = typer.Option(
        None, "--min-relevance", help="With --verify: drop hits whose relevance is below this (0-1; 0.5: the model "
        "says yes more than no). None left: no good match."),
    local: bool = typer.Option(False, "--local",
                               help="Load the model in this process even when `f2b serve` of this collection runs."),
    as_json: bool = JsonOpt,
) -> None:
    """Search the collection by text, by image, or by a stored image.

    While `f2b serve` of the same collection runs, text and --like ID searches are answered by it
    (no model load here: well under a second instead of several).
    """
    check(model=model, device=device, dtype=dtype)
    _check_verify(verify, min_relevance, text is not None and image is None and like is None)
    hits = None if local or model else _search_via_server(collection, text, image, like, k, offset, min_score,
                                                          filters, verify, min_relevance)
    if hits is None:
        with user_errors():
            with _service(collection, model, device, dtype) as service:
                hits = service.search(text=text, image=str(image) if image else None, like=like, k=k,
                                      filter=_parse_filters(filters), offset=offset, min_score=min_score,
                                      verify=verify, min_relevance=min_relevance)
    world_warning(collection)  # the demo model's blind spot, when the collection holds photos
    if min_relevance is not None:
        err(f"{getattr(hits, 'dropped', 0)} of the top {verify} hits dropped below relevance {min_relevance:g}"
            + ("" if hits else ": no good match"))
    if as_json:
        print_json([{"id": int(h.id), "path": str(h.path), "score": float(h.score)}
                    | ({"relevance": h.relevance} if verify is not None else {}) for h in hits])
        return
    if not hits:
        typer.echo("no good match" if verify is not None else "no results")
    for rank, h in enumerate(hits, offset + 1):
        checked = "" if verify is None else ("  (not verified)" if h.relevance is None else f"  p={h.relevance:.3f}")
        typer.echo(f"{rank:>3}. {h.score:+.4f}{checked}  [{h.id}]  {h.path}")


def _check_verify(verify: Optional[int], min_relevance: Optional[float], text: bool) -> None:
    """--verify / --min-relevance refused in one line (exit 2) before a model loads or a server is asked."""
    from fwd2bot_index.options import OptionError
    from fwd2bot_index.verification import check_verify

    try:
        check_verify(verify, min_relevance, text=text)
    except OptionError as exc:
        raise fail(str(exc), 2)


def _search_via_server(collection: Optional[Path], text: Optional[str], image: Optional[Path], like: Optional[str],
                       k: int, offset: int, min_score: Optional[float], filters: Optional[List[str]],
                       verify: Optional[int] = None, min_relevance: Optional[float] = None):
    """Hits from a running `f2b serve` of this collection, or None (then the search runs here, and
    says what is wrong with an empty query, an example image, a path for --like or two queries)."""
    if image is not None or (text is not None and like is not None):
        return None
    if text is not None and text.strip():
        body: dict = {"query": text}
    elif text is None and like is not None and like.isdigit():
        body = {"like": int(like)}
    else:
        return None
    from .remote import RemoteError, find_server, remote_search

    record = find_server(collection_path(collection))
    if record is None:
        return None
    body.update(k=k, offset=offset)
    if min_score is not None:
        body["min_score"] = min_score
    if verify is not None:
        body["verify"] = verify
    if min_relevance is not None:
        body["min_relevance"] = min_relevance
    if filters:
        body["filter"] = _parse_filters(filters)
    try:
        hits = remote_search(record, body)
    except RemoteError as exc:
        raise fail(str(exc))
    if hits is not None:
        _answered_by(record)
    return hits
