"""What every editing method shares: the edit request, the returned weight deltas with exact
restore, the run-level context, and the method registry.

An edit never mutates a model silently (EasyEdit#363): a method computes an
:class:`EditResult` holding the weight **deltas** (or, for in-context editing, a prompt prefix)
and leaves the model as it found it.  :meth:`EditResult.applied` applies the deltas for the
duration of a ``with`` block and restores the original tensors exactly (bitwise) afterwards,
so evaluating many edits applies each one to the unedited model; in-place editing is the
explicit :meth:`EditResult.apply` call.  With ``apply="intervention"`` (``--edit-apply``) the
deltas are instead added at the edited modules' outputs in every pass and no weight is written
(:mod:`~mlake_core.editing.intervention`).

Methods are registered by name (:func:`register_edit_method`, in each method's own module,
which :mod:`mlake_core.editing` imports) with one signature,
``method(adapter, requests, config, context) -> EditResult``, so the runner never branches
on method names.  The :class:`EditContext` carries what is not the method's own setting: the
random generator and the provider of key statistics (ROME, MEMIT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mlake_core.data.dataset import FactView
from mlake_core.errors import ConfigError, DataError
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.registry import Registry


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite, as the model sees it.

    Attributes:
        fact_id: MLaKE fact index.
        lang: the language the edit is requested in.
        form: the prompt form edited (``question`` or ``cloze``).
        prompt: the prompt text (template applied).
        prompt_ids: its token ids (BOS included when the model uses one).
        subject: the subject's text.
        subject_last: index in ``prompt_ids`` of the subject's last token (where ROME and
            MEMIT write).
        target_new: the new answer (the edit target) as text.
        target_new_ids: its token ids, joined after the prompt by ids.
        target_old: the original answer.
        statement_new: the edited fact as a sentence (``e_prompt`` in ``lang``), used by
            in-context editing.
        text: the form's own text, without the template's demonstrations (where ROME and
            MEMIT read the subject's key in general contexts,
            :mod:`~mlake_core.editing.contexts`); ``""`` when not known.
        text_subject: the subject's character span ``(start, end)`` in ``text``.
    """

    fact_id: int
    lang: str
    form: str
    prompt: str
    prompt_ids: tuple[int, ...]
    subject: str
    subject_last: int
    target_new: str
    target_new_ids: tuple[int, ...]
    target_old: str
    statement_new: str = ""
    text: str = ""
    text_subject: tuple[int, int] = (0, 0)


def subject_tokens(
    adapter: ModelAdapter, prompt: str, start: int, end: int, *, where: str
) -> tuple[int, ...]:
    """Indices (in the encoded prompt, BOS included) of every token overlapping the character
    span ``[start, end)`` of ``prompt``, in order.

    Tokens may merge across the span boundary in zh/ja; a token that overlaps counts.

    Raises:
        DataError: when no token overlaps the span (naming ``where``).
    """
    enc = adapter.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not hits:
        raise DataError(f"{where}: no token of the prompt covers the subject span")
    shift = len(adapter.encode(prompt)) - len(enc["input_ids"])  # BOS, when prepended
    return tuple(i + shift for i in hits)


def subject_last_token(
    adapter: ModelAdapter, prompt: str, start: int, end: int, *, where: str
) -> int:
    """Index of the last token overlapping the subject span (:func:`subject_tokens`): where
    ROME and MEMIT write."""
    return subject_tokens(adapter, prompt, start, end, where=where)[-1]


def content_start(adapter: ModelAdapter, ids: Sequence[int]) -> tuple[tuple[int, ...], int | None]:
    """Split token ids at the first token with content: ``(the whitespace-only tokens before
    it, that token)``; the token is ``None`` when no token has content."""
    for i, token in enumerate(ids):
        if adapter.tokenizer.decode([token]).strip():
            return tuple(ids[:i]), int(token)
    return tuple(ids), None


@dataclass(frozen=True)
class LocatedPrompt:
    """A fact view's prompt in one form, tokenized, with its subject's tokens located.

    Attributes:
        where: ``"fact F [lang] form form"``, for error messages.
        prompt: the prompt text (template applied).
        answer_prefix: what goes before an answer (joined by ids).
        prompt_ids: the encoded prompt (BOS included when the model uses one).
        subject: the subject's text.
        subject_positions: indices in ``prompt_ids`` of the subject's tokens.
    """

    where: str
    prompt: str
    answer_prefix: str
    prompt_ids: tuple[int, ...]
    subject: str
    subject_positions: tuple[int, ...]

    def answer_ids(self, adapter: ModelAdapter, answer: str) -> tuple[int, ...]:
        """Token ids of ``answer`` as it follows this prompt: the answer prefix and the
        stripped answer, encoded on their own (joined to the prompt by ids, never by text)."""
        return tuple(
            adapter.tokenizer(self.answer_prefix + answer.strip(), add_special_tokens=False)[
                "input_ids"
            ]
        )

    def answer_start(
        self, adapter: ModelAdapter, answer: str
    ) -> tuple[tuple[int, ...], int | None]:
        """The answer's first token *with content*, and the whitespace-only tokens before it.

        After the answer prefix (a space), a byte-level or SentencePiece tokenizer often
        encodes a Chinese or Japanese answer as a bare space token followed by the first
        character (``" 康奈尔大学"`` as ``" "``, ``"康"``, ... on Gemma 3 and mlake-tiny; on
        mlake-tiny French ``" université"`` too).  The space says nothing about the fact: its
        probability is near 1 whatever the subject.  Measures of "the answer's first token"
        read the first token with content, after the leading whitespace tokens are joined to
        the prompt.

        Returns:
            ``(leading whitespace-only token ids, the first token with content)``; the token is
            ``None`` when the answer has none.
        """
        return content_start(adapter, self.answer_ids(adapter, answer))


def locate_prompt(
    adapter: ModelAdapter, view: FactView, template: PromptTemplate, form: str = "question"
) -> LocatedPrompt:
    """The prompt of ``view`` in ``form`` and the tokens of its subject (shared by editing,
    causal tracing, attribution and probes).

    The subject is located at the offset where the template put the form's own text
    (:meth:`~mlake_core.models.prompting.PromptTemplate.place`): after any few-shot
    demonstrations and in-context editing prefix, which may hold the same words.

    Raises:
        ConfigError: an unknown form.
        DataError: when the form is not usable (no subject located; a cloze form that is not
            well-posed), or its prompt is longer than the model's learned positions
            (:meth:`~mlake_core.models.adapter.BaseAdapter.check_fits`; the memory check is
            the knowledge stage's), naming the fact, language and reason.
    """
    where = f"fact {view.fact_id} [{view.lang}] {form} form"
    if form not in ("question", "cloze"):
        raise ConfigError(f"form {form!r}: choose question or cloze")
    pf = view.form(form)  # type: ignore[arg-type]
    if not pf.usable or pf.text is None or pf.subject is None:
        raise DataError(f"{where}: not usable ({pf.reason or 'no subject located'})")
    placed = template.place(form, pf.text, view.lang)
    prompt = placed.prompt
    start, end = pf.subject.start + placed.text_offset, pf.subject.end + placed.text_offset
    if prompt[start:end] != pf.text[pf.subject.start : pf.subject.end]:
        raise DataError(
            f"{where}: the template {template.name!r} does not keep the subject "
            f"{pf.subject.text!r} where the text puts it"
        )
    ids = tuple(adapter.encode(prompt))
    adapter.check_fits(len(ids), where, memory=False)
    positions = subject_tokens(adapter, prompt, start, end, where=where)
    return LocatedPrompt(
        where=where,
        prompt=prompt,
        answer_prefix=placed.answer_prefix,
        prompt_ids=ids,
        subject=pf.subject.text,
        subject_positions=positions,
    )


def make_request(
    adapter: ModelAdapter, view: FactView, template: PromptTemplate, form: str = "question"
) -> EditRequest:
    """The edit request of a fact view in one prompt form.

    Raises:
        DataError: when the form is not usable (no subject located; a cloze form that is not
            well-posed), naming the fact, language and reason.
    """
    where = f"fact {view.fact_id} [{view.lang}] {form} form"
    if form not in ("question", "cloze"):
        raise ConfigError(f"--edit-form {form!r}: choose question or cloze")
    if view.edit_is_noop:
        raise DataError(f"{where}: the new answer is a form of the original answer (no edit)")
    pf = view.form(form)  # type: ignore[arg-type]
    if not pf.usable or pf.text is None or pf.subject is None:
        raise DataError(f"{where}: cannot be edited ({pf.reason or 'no subject located'})")
    located = locate_prompt(adapter, view, template, form)
    new = pf.edit_target.text.strip()
    new_ids = located.answer_ids(adapter, new)
    if not new_ids:
        raise DataError(f"{where}: the edit target is empty")
    return EditRequest(
        fact_id=view.fact_id,
        lang=view.lang,
        form=form,
        prompt=located.prompt,
        prompt_ids=located.prompt_ids,
        subject=located.subject,
        subject_last=located.subject_positions[-1],
        target_new=new,
        target_new_ids=new_ids,
        target_old=pf.target.text,
        statement_new=view.record.e_prompt,
        text=pf.text,
        text_subject=(pf.subject.start, pf.subject.end),
    )


@dataclass
class EditResult:
    """What an edit computed.

    Attributes:
        method: registry name.
        requests: the requests edited together.
        deltas: parameter name -> change of that weight (added on apply).  Empty for
            in-context editing.
        prefix: text put before every prompt (in-context editing), else ``""``.
        loss: the method's final optimization loss (NLL of the new target, nats), for
            reporting edits that quietly fail (EasyEdit#163).
        info: method-specific diagnostics (layer, norms, steps).
        factors: for a delta whose low rank the method knows (ROME: rank one; MEMIT: at most
            the number of edits), parameter name -> ``(left [out, r], right [r, in])`` with
            ``left @ right`` the change of the linear map (``deltas[name]``, transposed where
            the weight is stored ``[in, out]``: GPT-2's ``Conv1D``).  Applied as an
            intervention the edit then adds ``(x right^T) left^T``: cheaper than the dense
            delta, and a far smaller request to a remote server.
    """

    method: str
    requests: tuple[EditRequest, ...]
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    prefix: str = ""
    loss: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def _params(self, adapter: Any) -> dict[str, torch.nn.Parameter]:
        out = {}
        for name in self.deltas:
            param = written_parameter(adapter, name, f"{self.method} edit")
            if param.shape != self.deltas[name].shape:
                raise ValueError(
                    f"delta for {name} has shape {tuple(self.deltas[name].shape)}, "
                    f"the weight {tuple(param.shape)}"
                )
            out[name] = param
        return out

    def apply(self, adapter: Any) -> dict[str, torch.Tensor]:
        """Add the deltas to the model's weights in place.

        Returns:
            Copies of the original weights, for :func:`restore_weights`.
        """
        params = self._params(adapter)
        originals = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.add_(self.deltas[name].to(device=p.device, dtype=p.dtype))
        return originals

    @contextmanager
    def applied(self, adapter: Any, apply: str | None = None) -> Iterator[None]:
        """Apply the edit for the duration of a ``with`` block; leave the model as it was.

        Args:
            adapter: the model.
            apply: how (:data:`~mlake_core.editing.intervention.EDIT_APPLY`): ``weights``
                adds the deltas to the parameters and restores them exactly (bitwise) after;
                ``intervention`` adds ``ΔW x + Δb`` at each edited module's output in every
                pass inside the block and writes no parameter
                (:mod:`~mlake_core.editing.intervention`; a read-only backend can evaluate
                the edit).  ``None``: the adapter's ``edit_apply`` (set by the loader from
                ``ModelSettings.edit_apply``, ``--edit-apply``), else ``weights``.
        """
        from mlake_core.editing.intervention import (
            DEFAULT_EDIT_APPLY,
            check_edit_apply,
            output_deltas,
        )

        how = check_edit_apply(
            apply if apply is not None else getattr(adapter, "edit_apply", DEFAULT_EDIT_APPLY),
            "apply",
        )
        if how == "intervention":
            changes = output_deltas(adapter, self.deltas, f"{self.method} edit", self.factors)
            with adapter.adding(changes):
                yield
            return
        originals = self.apply(adapter)
        try:
            yield
        finally:
            restore_weights(adapter, originals)


def restore_weights(adapter: Any, originals: Mapping[str, torch.Tensor]) -> None:
    """Copy saved weights back (bitwise identical to before the edit)."""
    params = {name: written_parameter(adapter, name, "restore") for name in originals}
    with torch.no_grad():
        for name, saved in originals.items():
            params[name].copy_(saved)


def edited_parameter(adapter: Any, name: str, what: str) -> torch.nn.Parameter:
    """The parameter ``name`` (``"<module path>.<attribute>"``) that an edit writes, through
    :meth:`~mlake_core.models.adapter.BaseAdapter.editable_parameter`: never the token
    embedding or the unembedding (one tensor when tied, as in Qwen2 and Gemma 3).

    Raises:
        ConfigError: for the embedding or unembedding, or a name the model has no parameter
            of; the message starts with ``what`` (e.g. ``"rome edit"``).
    """
    try:
        return adapter.editable_parameter(name)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None
    except KeyError:
        raise ConfigError(
            f"{what}: {adapter.info.model_id} has no parameter {name!r} to edit"
        ) from None


def written_parameter(adapter: Any, name: str, what: str) -> torch.nn.Parameter:
    """:func:`edited_parameter`, for writing: refused where accelerate keeps the weight
    offloaded (a device map that puts a layer on CPU or disk holds its weights on ``meta``
    between passes; writing there would change nothing).

    Raises:
        ConfigError: as :func:`edited_parameter`, or for an offloaded weight (the message
            says to apply the edit as an intervention, which needs no writable weight).
    """
    param = edited_parameter(adapter, name, what)
    if param.device.type == "meta":
        raise ConfigError(
            f"{what}: {name} is offloaded by the device map (no weights in memory between "
            "passes), so it cannot be written; apply the edit with --edit-apply intervention, "
            "or load the model onto devices that hold it"
        )
    return param


def down_proj_name(adapter: Any, layer: int) -> str:
    """Parameter name of layer ``layer``'s MLP output-projection weight."""
    return adapter.spec.sites["mlp_post"].path(layer) + ".weight"


def down_proj(adapter: Any, layer: int, what: str) -> tuple[str, torch.nn.Parameter, bool]:
    """Layer ``layer``'s MLP output-projection weight as an edit writes it: its name, the
    parameter (through :func:`edited_parameter`), and whether it is stored ``[out, in]``
    (``Linear``) rather than ``[in, out]`` (GPT-2's ``Conv1D``)."""
    _, out_in = adapter.mlp_down(layer)
    name = down_proj_name(adapter, layer)
    return name, written_parameter(adapter, name, what), out_in


@dataclass
class EditContext:
    """Run-level inputs of an edit.

    Attributes:
        generator: the explicit random generator (methods never seed globally).
        second_moment: ``layer -> E[k k^T]`` of ``mlp_post.{layer}`` (float64, cached by the
            caller; see :mod:`mlake_core.editing.covariance`).
        demonstrations: for in-context editing, example edits in the edit language as
            ``(new fact sentence, question, new answer)``.
        unit_sets: for restricted editing, named neuron sets (``shared``, ``random``, and one
            per language: its specific neurons), as flat indices ``layer * d_mlp + neuron``.
        subject_mean: ``(layer, lang) -> `` the mean of ``resid_post.{layer}`` at the
            subject's last token over the run's edit prompts in ``lang`` (``[d_model]``,
            float32; cached by the caller), where ROME and MEMIT start ``δ`` with
            ``init: subject-mean``.
        context_prefixes: ``[(length, count), ...] ->`` the run's sampled prefixes, behind
            which ROME and MEMIT read the subject's key
            (:class:`~mlake_core.editing.contexts.ContextPrefixes`, drawn once per run).
            ``None``: each edit draws them from a generator seeded 0 (the same ones).
    """

    generator: torch.Generator
    second_moment: Callable[[int], torch.Tensor] | None = None
    demonstrations: Mapping[str, Sequence[tuple[str, str, str]]] = field(default_factory=dict)
    unit_sets: Mapping[str, Sequence[int]] = field(default_factory=dict)
    subject_mean: Callable[[int, str], torch.Tensor] | None = None
    context_prefixes: Callable[[Sequence[tuple[int, int]]], tuple[str, ...]] | None = None


class EditMethod(Protocol):
    """The one signature of every editing method."""

    def __call__(
        self,
        adapter: Any,
        requests: Sequence[EditRequest],
        config: Any,
        context: EditContext,
    ) -> EditResult: ...


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its function and its config dataclass.

    Attributes:
        name: the registry name.
        fn: the method.
        config_cls: its frozen config dataclass.
        batched: whether it accepts several requests at once.
    """

    name: str
    fn: EditMethod
    config_cls: type
    batched: bool


#: The editing methods, by name.  The built-in ones register themselves in their modules
#: (:mod:`~mlake_core.editing.ft`, ``rome``, ``memit``, ``ike``), which the package imports.
EDIT_METHODS: Registry[MethodEntry] = Registry("edit method", option="--method")


def register_edit_method(
    name: str, config_cls: type, *, batched: bool = False
) -> Callable[[EditMethod], EditMethod]:
    """Register an editing method under ``name`` (duplicates are refused)."""

    def deco(fn: EditMethod) -> EditMethod:
        EDIT_METHODS.register(name, MethodEntry(name, fn, config_cls, batched))
        return fn

    return deco


def get_method(name: str) -> MethodEntry:
    """Look up a method (the built-in ones are registered once :mod:`mlake_core.editing` is
    imported, which importing this module does first).

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    return EDIT_METHODS.get(name)
