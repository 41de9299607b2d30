"""Unit tier: site names, token batches, patches and BOS policies on synthetic inputs."""

from __future__ import annotations

import pytest
import torch

from mlake_core.errors import ConfigError
from mlake_core.models import (
    ARCHITECTURES,
    SITE_KINDS,
    BosPolicy,
    Patch,
    TokenBatch,
    all_sites,
    apply_patches,
    execution_order,
    get_spec,
    parse_site,
)
from mlake_core.models.tiny import TINY_ARCHITECTURES, build_tiny_tokenizer


def test_parse_site_accepts_canonical_names_and_negative_layers() -> None:
    assert parse_site("embed", 4).name == "embed"
    assert parse_site("mlp_post.3", 4).layer == 3
    assert parse_site("resid_post.-1", 4).name == "resid_post.3"


@pytest.mark.parametrize(
    "name", ["mlp", "resid_pre", "embed.0", "resid_pre.4", "resid_pre.-5", "attn_out.x", ""]
)
def test_parse_site_rejects_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match="site"):
        parse_site(name, 4)


def test_execution_order_sorts_by_layer_then_kind_and_drops_duplicates() -> None:
    names = ["resid_post.1", "mlp_out.0", "embed", "resid_pre.1", "mlp_post.0", "mlp_out.0"]
    order = [s.name for s in execution_order(names, 2)]
    assert order == ["embed", "mlp_post.0", "mlp_out.0", "resid_pre.1", "resid_post.1"]


def test_all_sites_lists_every_kind_per_layer() -> None:
    sites = all_sites(2)
    assert len(sites) == 1 + 2 * (len(SITE_KINDS) - 1)
    assert sites[:4] == ("embed", "resid_pre.0", "attn_z.0", "attn_out.0")
    assert sites[-1] == "resid_post.1"


def test_every_architecture_maps_every_site_kind() -> None:
    assert set(ARCHITECTURES) == set(TINY_ARCHITECTURES)
    for spec in ARCHITECTURES.values():
        assert set(spec.sites) == set(SITE_KINDS)
        block = spec.sites["resid_pre"].module
        # mlp_post / mlp_out are the two sides of the same down projection, unless a post-norm
        # follows it: then mlp_out is that norm's output (what joins the residual stream).
        # The same holds for attn_z / attn_out around the attention output projection.
        for neurons, out, norm in (
            ("mlp_post", "mlp_out", spec.mlp_post_norm),
            ("attn_z", "attn_out", spec.attn_post_norm),
        ):
            assert spec.sites[neurons].port == "input"
            assert spec.sites[out].port == "output"
            expected = spec.sites[neurons].module if norm is None else f"{block}.{norm}"
            assert spec.sites[out].module == expected
        assert spec.sites["resid_pre"].module == spec.sites["resid_post"].module


def test_a_post_norm_must_carry_the_sublayer_output() -> None:
    from dataclasses import replace

    from mlake_core.models.sites import GEMMA3, LLAMA

    assert GEMMA3.post_norms and not LLAMA.post_norms
    assert GEMMA3.post_norm("mlp") == "post_feedforward_layernorm"
    with pytest.raises(ValueError, match="post-norm"):
        replace(LLAMA, mlp_post_norm="post_feedforward_layernorm")


def test_architecture_facts_read_from_the_config() -> None:
    from types import SimpleNamespace

    from mlake_core.models.sites import GEMMA3, LLAMA

    config = SimpleNamespace(
        hidden_size=640,
        num_hidden_layers=6,
        sliding_window=512,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        final_logit_softcapping=None,
    )
    assert GEMMA3.embed_scale(config) == pytest.approx(640**0.5)
    assert GEMMA3.sliding_layers(config) == (0, 1, 2, 3, 4)
    assert GEMMA3.sliding_window(config) == 512
    assert GEMMA3.logit_softcap(config) is None
    config.final_logit_softcapping = 30.0
    assert GEMMA3.logit_softcap(config) == 30.0
    # Only full-attention layers: no window to respect.
    config.layer_types = ["full_attention"] * 6
    assert GEMMA3.sliding_layers(config) == () and GEMMA3.sliding_window(config) is None
    # Architectures without these features, whatever the config holds.
    assert LLAMA.embed_scale(config) == 1.0
    assert LLAMA.sliding_window(config) is None and LLAMA.logit_softcap(config) is None


def test_unsupported_architecture_lists_supported_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_spec("opt", source="my-model")
    for arch in ("gpt2", "llama", "qwen2", "bloom", "gpt_neox", "gemma3_text", "gemma2", "cohere"):
        assert arch in str(err.value)
    assert "'opt'" in str(err.value)


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_batch_padding_positions_and_indices(side: str) -> None:
    batch = TokenBatch.from_sequences([[5, 6, 7], [8]], pad_token_id=0, padding_side=side)
    if side == "left":
        assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
        assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
        assert batch.last_index.tolist() == [2, 2]
        assert batch.padded_index(1, 0) == 2
    else:
        assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
        assert batch.last_index.tolist() == [2, 0]
        assert batch.padded_index(1, -1) == 0
    assert batch.sequences() == [[5, 6, 7], [8]]
    assert batch.lengths.tolist() == [3, 1]


def test_token_batch_rejects_bad_masks() -> None:
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="left-padded"):
        TokenBatch(ids, torch.tensor([[1, 0, 1]]), "left")
    with pytest.raises(ValueError, match="at least one real token"):
        TokenBatch(ids, torch.tensor([[0, 0, 0]]), "left")
    with pytest.raises(ValueError, match="right-padded"):
        TokenBatch(ids, torch.tensor([[0, 1, 1]]), "right")


def test_patch_per_row_and_apply_write_exactly_the_given_entries() -> None:
    act = torch.zeros(3, 4, 2)
    patch = Patch.per_row(
        "resid_pre.0",
        [[1], [], [0, 3]],
        [torch.tensor([[1.0, 2.0]]), torch.zeros(0, 2), torch.tensor([[3.0, 4.0], [5.0, 6.0]])],
    )
    out = apply_patches(act, [patch])
    expected = torch.zeros(3, 4, 2)
    expected[0, 1] = torch.tensor([1.0, 2.0])
    expected[2, 0] = torch.tensor([3.0, 4.0])
    expected[2, 3] = torch.tensor([5.0, 6.0])
    assert torch.equal(out, expected)
    assert torch.equal(act, torch.zeros(3, 4, 2)), "apply_patches must not write in place"


def test_later_patches_win_and_from_activation_copies_source_rows() -> None:
    source = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    # ROME-style: copy clean row 0 into every row at position 1.
    patch = Patch.from_activation("embed", source, [[1], [1]], source_rows=[0, 0])
    assert torch.equal(patch.values, source[0, [1, 1]])
    first = Patch.per_row("embed", [[1], []], [torch.full((1, 2), 9.0), torch.zeros(0, 2)])
    out = apply_patches(torch.zeros(2, 3, 2), [first, patch])
    assert torch.equal(out[0, 1], source[0, 1])
    assert torch.equal(out[1, 1], source[0, 1])


def test_apply_patches_rejects_wrong_width_and_out_of_range() -> None:
    act = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="width"):
        apply_patches(act, [Patch.per_row("embed", [[0]], [torch.zeros(1, 4)])])
    with pytest.raises(IndexError):
        apply_patches(act, [Patch.per_row("embed", [[5]], [torch.zeros(1, 3)])])


@pytest.mark.parametrize(
    ("arch", "has_bos", "adds", "bos_is_eos"),
    [
        ("gpt2", True, False, True),
        ("llama", True, True, False),
        ("qwen2", False, False, False),
        ("bloom", True, False, False),
        ("gpt_neox", True, False, True),
        ("gemma3_text", True, True, False),
        ("gemma2", True, True, False),
        ("cohere", True, True, False),
    ],
)
def test_bos_policy_is_read_from_the_tokenizer(
    arch: str, has_bos: bool, adds: bool, bos_is_eos: bool
) -> None:
    policy = BosPolicy.from_tokenizer(build_tiny_tokenizer(arch))
    assert (policy.bos_token_id is not None) == has_bos
    assert policy.tokenizer_adds_bos == adds
    assert policy.prepend_bos == adds
    assert policy.bos_is_eos == bos_is_eos
    assert isinstance(policy.describe(), str)
