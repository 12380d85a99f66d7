"""Contract tests for every registered aggregator, plus model-specific checks."""

from __future__ import annotations

import pytest
import torch
from bag_helpers import pad

from mil.losses import AUX_LOSSES
from mil.models import MODELS, MILOutput, create_model
from mil.models.base import parameter_groups
from mil.models.layers import InstanceEmbedding, stochastic_top_k_mask

D = 16
NAMES = MODELS.names()
SOFTMAX_ATTENTION = {"abmil", "gated_abmil", "clam_sb", "clam_mb", "dsmil", "transmil"}


def make(name: str, n_outputs: int = 2, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, D, n_outputs, **kwargs)


def aux_loss(model: torch.nn.Module, out: MILOutput, labels: torch.Tensor, mask: torch.Tensor):
    return AUX_LOSSES.get(model.aux_loss)(out, labels, mask, **model.aux_loss_kwargs)


def valid_part(att: torch.Tensor, n: int) -> torch.Tensor:
    return att[..., :n]  # works for [N] and [C, N]


def test_softmax_models_are_registered() -> None:
    assert SOFTMAX_ATTENTION <= set(NAMES)


@pytest.mark.parametrize("n_outputs", [1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name: str, n_outputs: int) -> None:
    model = make(name, n_outputs).eval()
    x, mask = pad([torch.randn(n, D) for n in (7, 12, 3)])
    out = model(x, mask)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (3, n_outputs) and out.logits.is_floating_point()
    if out.attention is not None:
        assert out.attention.shape in {(3, 12), (3, n_outputs, 12)}
    assert all(isinstance(v, torch.Tensor) for v in out.aux.values())
    if hasattr(model, "aux_loss"):
        assert model.aux_loss in AUX_LOSSES and isinstance(model.aux_loss_kwargs, dict)


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance(name: str) -> None:
    model = make(name, 3).eval()
    bags = [torch.randn(n, D) for n in (5, 17, 1, 9)]
    x, mask = pad(bags)
    # Non-contiguous mask for bag 0: move its tiles to odd positions, garbage in between.
    x[0, 1:10:2], x[0, 0:10:2] = bags[0], torch.randn(5, D) * 50
    mask[0] = False
    mask[0, 1:10:2] = True
    with torch.no_grad():
        batched = model(x, mask)
        for i, bag in enumerate(bags):
            alone = model(bag[None])
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-5, rtol=1e-4)
            if batched.attention is None:
                continue
            att = batched.attention[i]
            assert (att[..., ~mask[i]] == 0).all(), "attention must be exactly zero on padding"
            torch.testing.assert_close(att[..., mask[i]], alone.attention[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SOFTMAX_ATTENTION))
def test_attention_is_a_distribution_over_valid_tiles(name: str) -> None:
    model = make(name, 2).eval()
    x, mask = pad([torch.randn(n, D) for n in (4, 11)])
    with torch.no_grad():
        att = model(x, mask).attention
    assert (att >= 0).all()
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str, n_outputs: int) -> None:
    model = make(name, n_outputs).train()
    x, mask = pad([torch.randn(n, D) for n in (20, 16, 25, 18)])
    labels = torch.arange(4) % max(n_outputs, 2)
    out = model(x, mask)
    loss = out.logits.sum()
    if hasattr(model, "aux_loss"):
        loss = loss + aux_loss(model, out, labels, mask)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{pname} has a zero/NaN gradient"


@pytest.mark.parametrize("name", NAMES)
def test_single_tile_bag(name: str) -> None:
    model = make(name, 2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, D))
    assert torch.isfinite(out.logits).all() and out.logits.shape == (1, 2)
    if name in SOFTMAX_ATTENTION:
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(out.attention.shape[:-1]))
    if hasattr(model, "aux_loss"):
        assert torch.isfinite(aux_loss(model, out, torch.tensor([1]), torch.ones(1, 1, dtype=torch.bool)))


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name: str) -> None:
    model = make(name, 2).eval()
    x, mask = pad([torch.randn(n, D) for n in (6, 9)])
    with torch.no_grad():
        a, b = model(x, mask), model(x, mask)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_on_cpu(name: str) -> None:
    model = make(name, 3).eval()
    x, mask = pad([torch.randn(n, D) for n in (6, 10)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
        if hasattr(model, "aux_loss"):
            assert torch.isfinite(aux_loss(model, out, torch.tensor([0, 2]), mask))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits.float()).all()
    if out.attention is not None:
        assert (out.attention[0, ..., 6:] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_unknown_kwargs_are_named(name: str) -> None:
    with pytest.raises(TypeError, match="not_an_option"):
        create_model(name, D, 2, not_an_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_mi_net_embedding_is_expressible(name: str) -> None:
    model = make(name, 2, embed_dims=[32, 24, 8]).eval()
    assert model(torch.randn(2, 5, D)).logits.shape == (2, 2)


def test_unknown_model_lists_registry() -> None:
    with pytest.raises(KeyError) as err:
        create_model("no_such_model", D, 2)
    assert all(n in str(err.value) for n in NAMES)


def test_instance_embedding_layout() -> None:
    emb = InstanceEmbedding(166, [256, 128, 64], dropout=0.1)
    kinds = [type(m).__name__ for m in emb.net]
    assert kinds == ["Linear", "ReLU", "Dropout"] * 3 and emb.out_dim == 64
    assert InstanceEmbedding(D, hidden_dim=7).out_dim == 7
    assert InstanceEmbedding(D, []).out_dim == D


def test_gated_differs_from_plain() -> None:
    plain, gated = make("abmil"), make("gated_abmil")
    assert len(list(gated.parameters())) > len(list(plain.parameters()))
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(x).attention, gated.eval()(x).attention)


def planted_bags(n_bags: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags of 20-40 N(0, 1) tiles; positive bags hold 2-4 tiles shifted along one direction."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_bags) % 2
    bags = []
    for y in labels.tolist():
        bag = torch.randn(int(torch.randint(20, 41, (1,), generator=g)), D, generator=g)
        if y:
            k = int(torch.randint(2, 5, (1,), generator=g))
            bag[:k, :4] += 3.0
            bag = bag[torch.randperm(len(bag), generator=g)]
        bags.append(bag)
    x, mask = pad(bags)
    return x, mask, labels


def test_gated_abmil_learns_planted_tiles() -> None:
    x, mask, labels = planted_bags(48)
    model = make("gated_abmil", 2, hidden_dim=32, attn_dim=16, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, mask).logits, labels).backward()
        opt.step()
    with torch.no_grad():
        acc = (model.eval()(x, mask).logits.argmax(1) == labels).float().mean()
    assert acc >= 0.95


def test_clam_aux_loss_decreases_on_planted_tiles() -> None:
    x, mask, labels = planted_bags(32, seed=1)
    model = make("clam_sb", 2, hidden_dim=32, attn_dim=16, dropout=0.0, k_sample=2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        out = model(x, mask)
        inst = aux_loss(model, out, labels, mask)
        (torch.nn.functional.cross_entropy(out.logits, labels) + inst).backward()
        opt.step()
        losses.append(float(inst.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.3 * losses[0]


def test_clam_instance_loss_targets_and_mask() -> None:
    # One bag of class 1 with 4 valid tiles; the 2 padded tiles have the highest attention.
    attention = torch.tensor([[[0.0, 0, 0, 0, 0, 0], [0.1, 0.5, 0.3, 0.05, 9.0, 9.0]]])  # [1, 2, 6]
    mask = torch.tensor([[True, True, True, True, False, False]])
    good = torch.zeros(1, 2, 6, 2)  # class 0's classifier is undecided (logits 0)
    good[0, 1, :, 1] = torch.tensor([-10.0, 10, 10, -10, -10, -10])  # tiles 1, 2 = top-2 valid
    good[0, 1, :, 0] = -good[0, 1, :, 1]
    out = MILOutput(logits=torch.zeros(1, 2), aux={"instance_logits": good, "attention": attention})
    loss = AUX_LOSSES.get("clam_instance")
    y = torch.tensor([1])
    assert loss(out, y, mask, k_sample=2) < 1e-6  # padding ignored, class 0 skipped
    assert loss(out, y, mask, k_sample=8) < 1e-6  # k clamped to n // 2 = 2
    subtyping = loss(out, y, mask, k_sample=2, subtyping=True)  # class 0 top-2 -> negative: ln 2
    torch.testing.assert_close(subtyping, torch.log(torch.tensor(2.0)) / 2)
    flipped = MILOutput(logits=out.logits, aux={"instance_logits": -good, "attention": attention})
    assert loss(flipped, y, mask, k_sample=2) > 5.0
    with pytest.raises(ValueError, match="labels"):
        loss(out, torch.tensor([2]), mask)


def test_dsmil_critical_instance_is_top_valid_tile() -> None:
    model = make("dsmil", 3).eval()
    x, mask = pad([torch.randn(n, D) for n in (6, 13)])
    with torch.no_grad():
        out = model(x, mask)
    inst = out.aux["instance_logits"]  # [B, N, C]
    assert inst.shape == (2, 13, 3)
    for b, n in enumerate((6, 13)):
        torch.testing.assert_close(out.aux["critical_index"][b], inst[b, :n].argmax(0))
    expected = torch.nn.functional.cross_entropy(
        torch.stack([inst[0, :6].amax(0), inst[1].amax(0)]), torch.tensor([2, 0])
    )
    torch.testing.assert_close(
        AUX_LOSSES.get("dsmil_max_instance")(out, torch.tensor([2, 0]), mask), expected
    )


def test_transmil_attention_is_last_layer_cls_row_with_grid_copies_summed() -> None:
    model = make("transmil", 2, hidden_dim=32, n_heads=4).eval()
    captured = {}
    model.layer2.register_forward_hook(lambda mod, inp, out: captured.update(cls=out[1]))
    n = 5  # 3x3 grid: tiles 0-3 appear twice
    with torch.no_grad():
        att = model(torch.randn(1, n, D)).attention[0]
    cls = captured["cls"][0]  # [1 + 9]: [CLS] itself, then the grid
    assert captured["cls"].shape == (1, 10)
    expected = cls[1 : 1 + n].clone()
    expected[:4] += cls[1 + n :]
    torch.testing.assert_close(att, expected / expected.sum())


def test_transmil_ppeg_equals_the_papers_three_convolutions() -> None:
    from mil.models.transmil import PPEG

    torch.manual_seed(0)
    ppeg, side = PPEG(24), 5
    x = torch.randn(3, 1 + side * side, 24, requires_grad=True)
    grid = x[:, 1:].transpose(1, 2).reshape(3, 24, side, side)  # [B, E, S, S] as in the reference
    grid = grid + sum(conv(grid) for conv in ppeg.convs)
    expected = torch.cat([x[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    got = ppeg(x, side)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [ppeg.convs[1].weight, x])
    expected_grads = torch.autograd.grad(expected.square().sum(), [ppeg.convs[1].weight, x])
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_transmil_batches_equal_size_bags_without_changing_them() -> None:
    model = make("transmil", 2, hidden_dim=32, n_heads=4).eval()
    bags = [torch.randn(n, D) for n in (9, 9, 5, 9)]
    x, mask = pad(bags)
    with torch.no_grad():
        together = model(x, mask)
        alone = [model(b[None]) for b in bags]
    for i, out in enumerate(alone):
        torch.testing.assert_close(together.logits[i], out.logits[0])
        torch.testing.assert_close(together.attention[i, : len(bags[i])], out.attention[0])


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("dsmil", {"passing_v": True, "nonlinear_q": False, "embed_dims": []}),
        ("clam_mb", {"subtyping": True, "k_sample": 3}),
        ("transmil", {"hidden_dim": 24, "n_heads": 3}),
    ],
)
def test_model_options(name: str, kwargs: dict) -> None:
    model = make(name, 3, **kwargs)
    x, mask = pad([torch.randn(n, D) for n in (4, 7)])
    out = model(x, mask)
    loss = out.logits.sum()
    if hasattr(model, "aux_loss"):
        assert model.aux_loss_kwargs.get("k_sample", 3) == 3
        loss = loss + aux_loss(model, out, torch.tensor([0, 2]), mask)
    loss.backward()
    assert torch.isfinite(out.logits).all()


def test_transmil_rejects_indivisible_width() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        create_model("transmil", D, 2, hidden_dim=30, n_heads=8)


@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_pooled_embedding_and_head_contract(name: str, n_outputs: int) -> None:
    """``MILOutput.embedding`` [B, embedding_dim] is what ``classify`` turns into the logits (the fusion hook)."""
    model = make(name, n_outputs).eval()
    x, mask = pad([torch.randn(n, D) for n in (7, 12, 3)])
    out = model(x, mask)
    assert out.embedding is not None and out.embedding.shape == (3, model.embedding_dim)
    torch.testing.assert_close(model.classify(out.embedding), out.logits)
    alone = model(x[2:, :3], None)  # padding does not reach the embedding
    torch.testing.assert_close(alone.embedding, out.embedding[2:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_hold_every_trainable_parameter_once(name: str) -> None:
    model = make(name)
    grouped = [id(p) for g in parameter_groups(model) for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["abmil", "gated_abmil", "clam_sb", "clam_mb"])
def test_the_attention_network_learns_at_its_lr_scale(name: str) -> None:
    model = make(name, attn_lr_scale=0.25)
    scale = {id(p): g["lr_scale"] for g in parameter_groups(model) for p in g["params"]}
    attention = {id(p) for p in model.pool.parameters()}
    assert attention and all(scale[i] == 0.25 for i in attention)
    assert all(s == 1.0 for i, s in scale.items() if i not in attention)
    with pytest.raises(ValueError, match="lr_scale"):
        make(name, attn_lr_scale=0.0)


def test_the_innermost_lr_scale_wins() -> None:
    inner, outer = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))
    inner.lr_scale, outer.lr_scale = 2.0, 0.5
    outer.append(inner)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), outer)
    groups = {g["lr_scale"]: {id(p) for p in g["params"]} for g in parameter_groups(model)}
    assert groups == {
        1.0: {id(p) for p in model[0].parameters()},
        0.5: {id(p) for p in outer[0].parameters()},
        2.0: {id(p) for p in inner.parameters()},
    }


def test_stochastic_top_k_mask_hides_a_fraction_of_each_rows_top_tiles() -> None:
    torch.manual_seed(0)
    n_valid = torch.tensor([20, 5, 1, 12])
    scores = torch.randn(4, 2, 20)  # [B, K, N]
    valid = (torch.arange(20) < n_valid[:, None])[:, None, :].expand(4, 2, 20)
    kept = stochastic_top_k_mask(scores, valid, k=10, fraction=0.6)
    hidden = valid & ~kept
    assert not (kept & ~valid).any()  # padding stays masked
    for b, n in enumerate(n_valid.tolist()):
        k = min(10, n)
        for row in range(2):
            top = scores[b, row, :n].topk(k).indices
            assert hidden[b, row].sum() == int(k * 0.6)  # 6, 3, 0, 6
            assert set(hidden[b, row].nonzero().flatten().tolist()) <= set(top.tolist())
    assert kept.sum(-1).min() >= 1
    torch.manual_seed(0)
    torch.randn(4, 2, 20)
    assert torch.equal(stochastic_top_k_mask(scores, valid, k=10, fraction=0.6), kept)  # the seed fixes the draw
    assert not torch.equal(stochastic_top_k_mask(scores, valid, k=10, fraction=0.6), kept)  # and it changes per step


@pytest.mark.parametrize("name", ["abmil", "gated_abmil"])
def test_attention_masking_applies_in_training_only(name: str) -> None:
    torch.manual_seed(0)
    masked, plain = make(name, attn_mask_top_k=4), make(name)
    plain.load_state_dict(masked.state_dict())
    x, mask = pad([torch.randn(n, D) for n in (9, 3)])
    masked.eval(), plain.eval()
    torch.testing.assert_close(masked(x, mask).logits, plain(x, mask).logits)
    masked.train()
    attention = masked(x, mask).attention  # [B, N]
    assert ((attention == 0) & mask).sum(-1).tolist() == [2, 1]  # floor(4 * 0.6), floor(3 * 0.6)
    with pytest.raises(ValueError, match="attn_mask_top_k"):
        make(name, attn_mask_top_k=-1)
    with pytest.raises(ValueError, match="attn_mask_fraction"):
        make(name, attn_mask_top_k=10, attn_mask_fraction=1.0)
