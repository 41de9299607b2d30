"""Knowledge editing: requests, methods (a registry), exact restore, key statistics.

* :mod:`~mlake_core.editing.base` -- :class:`EditRequest`, :class:`EditResult` (weight deltas,
  exact restore), :class:`EditContext`, the method registry.
* :mod:`~mlake_core.editing.methods` -- FT, ROME, IKE; :mod:`~mlake_core.editing.memit` -- MEMIT.
* :mod:`~mlake_core.editing.covariance` -- ``E[k k^T]`` of MLP keys for ROME and MEMIT.
"""

from mlake_core.editing.base import (
    EDIT_METHODS,
    EditContext,
    EditRequest,
    EditResult,
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
    "get_method",
    "make_request",
    "register_edit_method",
    "restore_weights",
]
