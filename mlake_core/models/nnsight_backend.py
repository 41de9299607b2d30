"""nnsight 0.8 backend: every nnsight idiom in mlake lives in this module.

The loaded Hugging Face model is wrapped with ``nnsight.TransformersModel(model,
tokenizer=...)`` (0.8's replacement for the deprecated ``LanguageModel``).  Each forward pass is
one ``with model.trace(input_ids=..., attention_mask=..., position_ids=...)`` block in which
sites are read and written through envoys:

* a site at a module's ``"input"`` port is ``envoy.input`` (the first positional argument,
  i.e. the hidden states), written back with ``envoy.input = value``;
* a site at an ``"output"`` port is ``envoy.output``.  Under transformers 5 decoder layers
  (GPT-2, Llama, Qwen2, GPT-NeoX) return a plain tensor but BLOOM's block still returns a tuple
  ``(hidden, attention_weights)``, so the first element is taken when the output is a tuple and
  the tuple is rebuilt when writing.

nnsight serves values in execution order and refuses out-of-order reads, so sites are visited
sorted by :func:`mlake_core.models.sites.execution_order`.  Values leave the trace through
``nnsight.save``.  Position ids are always passed explicitly: nnsight derives them from the mask
only for tokenizers that pad on the left (``nnsight/modeling/processing.py``,
``supply_position_ids``), and mlake's batches may be padded on either side (nnsight#672).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import (
    BaseAdapter,
    Logits,
    ModelInfo,
    PastKeyValues,
    Patch,
    TokenBatch,
    UnitPatch,
    apply_patches,
)
from mlake_core.models.sites import ArchitectureSpec, Site


class NNsightAdapter(BaseAdapter):
    """A :class:`~mlake_core.models.adapter.ModelAdapter` over an nnsight ``TransformersModel``.

    Args:
        hf_model: the loaded HF causal LM (eval mode, eager attention).
        tokenizer: its tokenizer (nnsight's text pipeline gets a copy).
        spec: the architecture's site table.
        info: provenance and shapes.
    """

    def __init__(
        self, hf_model: torch.nn.Module, tokenizer: Any, spec: ArchitectureSpec, info: ModelInfo
    ) -> None:
        super().__init__(tokenizer, spec, info)
        self._index_modules(hf_model)
        from nnsight import TransformersModel

        self.model = TransformersModel(
            hf_model, task="text-generation", tokenizer=copy.deepcopy(tokenizer)
        )
        #: nnsight's ``remote=`` of every trace: ``False`` (run here), ``True`` (send each pass
        #: to the NDIF host, ``nnsight.CONFIG.API.HOST``, under the hub id the model was loaded
        #: from; needs network and an NDIF API key) or ``"local"`` (serialize and deserialize
        #: each pass as a remote one would be, then run it here: nnsight's dry run of the
        #: remote path).  Only what the trace computes goes remote (see the README).
        self.remote: bool | str = False

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
        import nnsight

        cache: dict[str, Tensor] = {}
        wanted = set(read)
        last = max(wanted) if stop and wanted else None
        # Output deltas (BaseAdapter.adding): visited at their projection's input site (read
        # after its patches) and added at its output, before the output site's read or patch.
        deltas = self._delta_plan()
        by_in = {site_in: (path, site_out, ds) for path, (site_in, site_out, ds) in deltas.items()}
        by_out = {out: (path, ds) for path, (_, out, ds) in deltas.items() if out is not None}
        visit = set(by_in) | set(by_out)
        if last is not None:
            visit = {site for site in visit if site <= last}
        plan = []
        for site in sorted(wanted | set(patches) | visit):
            where = self.spec.sites[site.kind]
            plan.append((site, where.path(site.layer), where.port, patches.get(site, [])))
        inputs = self._model_inputs(batch, last_only, past, keep_past=past_out is not None)
        pending: dict[str, Tensor] = {}  # a projection's input, until its output is visited
        if self.remote is True and keep_graph:
            # The values come back from the server as plain tensors: no graph to
            # differentiate locally.
            raise ConfigError(
                f"{self.info.model_id}: gradients (attribution patching, integrated "
                "gradients, computing an edit) cannot be taken from a remote (NDIF) pass; "
                "run them without --remote"
            )
        if self.remote:
            inputs["remote"] = self.remote
        with self.model.trace(**inputs) as tracer:
            for site, path, port, site_patches in plan:
                envoy = self.model.get(path)
                if port == "input":
                    value = envoy.input
                    if site_patches:
                        value = apply_patches(value, site_patches)
                        envoy.input = value
                else:
                    output = envoy.output
                    is_tuple = isinstance(output, tuple)
                    value = output[0] if is_tuple else output
                    if site in by_out:
                        delta_path, site_deltas = by_out[site]
                        for delta in site_deltas:
                            value = value + delta.added(pending[delta_path])
                    if site_patches:
                        value = apply_patches(value, site_patches)
                    if site_patches or site in by_out:
                        envoy.output = (value, *output[1:]) if is_tuple else value
                if site in wanted:
                    cache[site.name] = nnsight.save(value if keep_graph else value.detach())
                if site == last:
                    tracer.stop()  # nothing after the last site read runs (``stop``)
                if site in by_in:
                    delta_path, site_out, site_deltas = by_in[site]
                    if site_out is None:  # no site at the projection's output: add there now
                        projection = self.model.get(delta_path)
                        out_value = projection.output
                        for delta in site_deltas:
                            out_value = out_value + delta.added(value)
                        projection.output = out_value
                    else:
                        pending[delta_path] = value
            if last is None:
                logits = nnsight.save(self.model.output.logits)
                if past_out is not None:
                    hf_cache = nnsight.save(self.model.output.past_key_values)
        if not keep_graph:  # on the model's device, whatever layer's device (device map)
            cache = {name: value.to(self.device) for name, value in cache.items()}
        if last is not None:
            return torch.empty(0), cache
        if past_out is not None:
            past_out.append(hf_cache)
        return logits.to(self.device), cache
