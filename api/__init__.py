"""The REST service and search page: thin, calls the service facade.

``create_app(service_or_path, ...)`` builds the FastAPI app; ``serve(collection, ...)`` runs it with
uvicorn (``f2b serve``). The page is ``api/static/`` (plain HTML, CSS and JS, no build step).
"""

from .app import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, create_app
from .server import is_loopback, make_server, serve

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_UPLOAD_BYTES", "create_app", "is_loopback", "make_server", "serve"]
