"""Knowledge editing: requests, methods (a registry), exact restore, key statistics.

* :mod:`~mlake_core.editing.base` -- :class:`EditRequest`, :class:`EditResult` (weight deltas,
  exact restore), :class:`EditContext`, the method registry (:data:`EDIT_METHODS`).
* :mod:`~mlake_core.editing.layers` -- which layers an edit writes to (checks, defaults).
* :mod:`~mlake_core.editing.delta` -- the ``δ`` optimisation ROME and MEMIT share.
* One module per method, each registering itself: :mod:`~mlake_core.editing.ft`,
  :mod:`~mlake_core.editing.rome`, :mod:`~mlake_core.editing.memit`,
  :mod:`~mlake_core.editing.ike`.
* :mod:`~mlake_core.editing.covariance` -- ``E[k k^T]`` of MLP keys for ROME and MEMIT.

Importing this package registers the built-in methods; look them up with :func:`get_method`.
"""

from mlake_core.editing import ft, ike, memit, rome  # noqa: F401  (register the built-ins)
from mlake_core.editing.base import (
    EDIT_METHODS,
    EditContext,
    EditRequest,
    EditResult,
    MethodEntry,
    get_method,
    make_request,
    register_edit_method,
    restore_weights,
)

__all__ = [
    "EDIT_METHODS",
    "EditContext",
    "EditRequest",
    "EditResult",
    "MethodEntry",
    "get_method",
    "make_request",
    "register_edit_method",
    "restore_weights",
]
