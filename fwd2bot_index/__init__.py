"""fwd2bot-index: image collections compressed by the vision-language model itself.

Importing the package stays light (no torch): the model lives in ``fwd2bot_index.model`` and the
collection facade in ``fwd2bot_index.service``.
"""

__version__ = "0.1.0"
