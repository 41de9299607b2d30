"""TransformerLens 4.x backend: every TransformerLens idiom in mlake lives in this module.

The model is wrapped with ``TransformerBridge.boot_transformers(..., hf_model=model)``, which
keeps the raw Hugging Face weights (no layer-norm folding, no weight centring; those only
happen in ``enable_compatibility_mode``, which mlake never calls), so activations equal the HF
model's (TransformerLens#223).

The bridge inserts a ``GeneralizedComponent`` around each HF module it knows and gives it two
hook points, ``hook_in`` (the module's first input) and ``hook_out`` (its output, the first
element of a tuple).  A canonical site is resolved through the shared site table
(:mod:`mlake_core.models.sites`) to an HF module and a port, and from there -- by the identity
of the wrapped module, never by its name -- to the bridge's ``<component>.hook_in`` or
``hook_out``.  Both backends therefore hook exactly the same module boundary.  TransformerLens'
own aliases are not used: on BLOOM, ``blocks.L.attn.hook_out`` includes the residual
(TransformerLens#1639) while mlake's ``attn_out`` does not.

Hooks are only ever added through ``bridge.hooks(...)``, a context manager that removes them on
exit, even after an exception.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import (
    BaseAdapter,
    Logits,
    ModelInfo,
    OutputDelta,
    PastKeyValues,
    Patch,
    TokenBatch,
    UnitPatch,
    apply_patches,
)
from mlake_core.models.sites import ArchitectureSpec, Site, all_sites, parse_site


class _StopForward(Exception):
    """Ends a forward pass once the last site it reads is read (:meth:`BaseAdapter.activations`).

    TransformerLens' own ``stop_at_layer`` stops at a block's input, and a site may lie inside
    a block (``mlp_post.L``): raising from that site's hook stops exactly there.
    """


class TLensAdapter(BaseAdapter):
    """A :class:`~mlake_core.models.adapter.ModelAdapter` over a TransformerLens bridge.

    Args:
        hf_model: the loaded HF causal LM (eval mode, eager attention).  The bridge wraps its
            modules in place, so the model must not be shared with another adapter.
        tokenizer: its tokenizer (a copy is handed to the bridge, which modifies tokenizers).
        spec: the architecture's site table.
        info: provenance and shapes.
    """

    def __init__(
        self, hf_model: torch.nn.Module, tokenizer: Any, spec: ArchitectureSpec, info: ModelInfo
    ) -> None:
        super().__init__(tokenizer, spec, info)
        self._index_modules(hf_model)
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.generalized_components.base import (
            GeneralizedComponent,
        )

        # Resolve every site's module before booting: the bridge re-parents HF modules under
        # its components, after which an HF path may name the wrapper or the wrapped module
        # (transformer.h.0.mlp.c_proj -> LinearBridge, transformer.h.0.attn.c_proj -> Conv1D);
        # module identity is the stable handle.
        targets = {
            name: (hf_model.get_submodule(self._where(name)[0]), self._where(name)[1])
            for name in all_sites(info.n_layers)
        }
        # The bridge picks its architecture adapter by config.architectures, which configs
        # rebuilt from a GGUF file leave empty (Gemma 3 270M Q4_K_M): name the loaded class.
        overrides: dict[str, Any] = {}
        if not getattr(hf_model.config, "architectures", None):
            overrides["architectures"] = [type(hf_model).__name__]
        # The name the weights were loaded from (a folder or hub id), not the user's: a short
        # name such as mlake's ``gemma-3-270m`` is a deprecated TransformerLens alias.
        self.bridge = TransformerBridge.boot_transformers(
            str(getattr(hf_model, "name_or_path", "") or info.model_id),
            hf_config_overrides=overrides or None,
            hf_model=hf_model,
            # setup_tokenizer in TL mutates the tokenizer it is given (it invents a BOS for
            # tokenizers without one), so it gets a copy.
            tokenizer=copy.deepcopy(tokenizer),
            device=info.device,
            dtype=self.dtype,
            trust_remote_code=info.trust_remote_code,
        )
        self.bridge.eval()
        by_module: dict[int, Any] = {}
        for component in self.bridge.modules():
            if isinstance(component, GeneralizedComponent):
                original: Any = component.original_component
                if original is not None:
                    by_module.setdefault(id(original), component)
        # The bridge component wrapping each HF module (by identity), for output deltas.
        self._wrappers = by_module
        self._hook_names: dict[str, str] = {}
        for name, (module, port) in targets.items():
            wrapper = by_module.get(id(module))
            if wrapper is None:
                raise ConfigError(
                    f"TransformerLens bridge of {info.model_id!r} ({info.architecture}) does not "
                    f"wrap {self.module_path(name)}, needed for site {name!r}; "
                    "use --backend nnsight for this model"
                )
            hook_point: Any = wrapper.hook_in if port == "input" else wrapper.hook_out
            self._hook_names[name] = str(hook_point.name)

    def hook_name(self, site: str) -> str:
        """The TransformerLens hook point carrying ``site`` (e.g. ``blocks.3.mlp.out.hook_in``)."""
        return self._hook_names[parse_site(site, self.n_layers).name]

    def _where(self, name: str) -> tuple[str, str]:
        parsed = parse_site(name, self.info.n_layers)
        module_site = self.spec.sites[parsed.kind]
        return module_site.path(parsed.layer), module_site.port

    def _delta_hooks(
        self,
    ) -> tuple[list[tuple[str, Callable[..., Tensor]]], list[tuple[str, Callable[..., Tensor]]]]:
        """Hooks applying the standing output deltas: ``(adders on the projections'
        hook_out, capturers of their inputs on hook_in)``."""
        adds: list[tuple[str, Callable[..., Tensor]]] = []
        captures: list[tuple[str, Callable[..., Tensor]]] = []
        for path, (_, _, deltas) in self._delta_plan().items():
            wrapper = self._wrappers.get(id(self.hf_module(path)))
            if wrapper is None:
                raise ConfigError(
                    f"TransformerLens bridge of {self.info.model_id!r} does not wrap {path}; "
                    "use --backend nnsight to apply an edit as an intervention"
                )
            seen: list[Tensor] = []

            def capture(activation: Tensor, hook: Any, seen: list[Tensor] = seen) -> Tensor:
                seen.clear()
                seen.append(activation.flatten(-2) if activation.ndim == 4 else activation)
                return activation

            def add(
                activation: Tensor,
                hook: Any,
                seen: list[Tensor] = seen,
                deltas: tuple[OutputDelta, ...] = deltas,
            ) -> Tensor:
                (inputs,) = seen
                seen.clear()
                for delta in deltas:
                    activation = activation + delta.added(inputs)
                return activation

            captures.append((str(wrapper.hook_in.name), capture))
            adds.append((str(wrapper.hook_out.name), add))
        return adds, captures

    def _run(
        self,
        batch: TokenBatch,
        read: list[Site],
        patches: dict[Site, list[Patch | UnitPatch]],
        *,
        keep_graph: bool,
        last_only: bool | int = False,
        past: PastKeyValues | None = None,
        past_out: list[Any] | None = None,
        stop: bool = False,
    ) -> tuple[Logits, dict[str, Tensor]]:
        cache: dict[str, Tensor] = {}
        wanted = set(read)
        last = max(wanted) if stop and wanted else None

        def make_hook(site: Site) -> Callable[..., Tensor]:
            site_patches = patches.get(site, [])

            def fn(activation: Tensor, hook: Any) -> Tensor:
                shape = activation.shape
                # Some bridges hand the attention output projection its input split by head,
                # [batch, pos, n_heads, d_head]; attn_z is the concatenation.  The flat view
                # is what is patched, cached and returned, so gradients reach the cached one.
                if activation.ndim == 4:
                    activation = activation.flatten(-2)
                if site_patches:
                    activation = apply_patches(activation, site_patches)
                if site in wanted:
                    cache[site.name] = activation if keep_graph else activation.detach()
                if site == last:
                    raise _StopForward
                return activation.view(shape)

            return fn

        fwd_hooks = [
            (self._hook_names[site.name], make_hook(site)) for site in sorted(wanted | set(patches))
        ]
        if self._deltas:
            # Output deltas (BaseAdapter.adding): the projection's input is captured after any
            # patch of its input site (hooks on one point run in the order added), and the
            # term is added to its output before any read or patch of the output site.
            adds, captures = self._delta_hooks()
            fwd_hooks = [*adds, *fwd_hooks, *captures]
        inputs = self._model_inputs(batch, last_only, past, keep_past=past_out is not None)
        try:
            with self.bridge.hooks(fwd_hooks=fwd_hooks):
                # "logits_and_cache" returns (logits, the HF cache after this pass).
                out = self.bridge(
                    inputs.pop("input_ids"),
                    return_type="logits" if past_out is None else "logits_and_cache",
                    attention_mask=inputs.pop("attention_mask"),
                    **inputs,
                )
        except _StopForward:
            # Raised by the hook of the last site read (``stop``); the hooks are removed.
            return torch.empty(0), self._on_device(cache, keep_graph)
        if past_out is not None:
            logits, hf_cache = out
            past_out.append(hf_cache)
        else:
            logits = out
        missing = [site.name for site in read if site.name not in cache]
        if missing:
            raise RuntimeError(f"TransformerLens hooks did not fire for sites {missing}")
        return logits.to(self.device), self._on_device(cache, keep_graph)

    def _on_device(self, cache: dict[str, Tensor], keep_graph: bool) -> dict[str, Tensor]:
        """Read activations on the model's device, whatever layer's device they were read on
        (a device map); live ones (``keep_graph``) stay where they are, in the graph."""
        if keep_graph:
            return cache
        return {name: value.to(self.device) for name, value in cache.items()}
