"""Contract tests over every registered model (timm-style), and the registries' consistency."""
import pytest
import torch

from featseq.sequence import catalog, config, models as M, splits

VARIANTS = [(name, {}) for name in M.MODELS] + [
    ("lstm", {"bidirectional": True, "layers": 2}), ("gru", {"pooling": "attention", "bidirectional": True}),
    ("rnn", {"pooling": "mean"}), ("lstm", {"pooling": "max"}), ("conv1d", {"kernel": 4, "pooling": "mean"}),
    ("transformer", {"pooling": "attention", "heads": 2}), ("mlp", {"layers": 2}),
]
D, C = 12, 3
LENGTHS = [7, 4, 1]


def batch(seed=0, garbage=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), max(LENGTHS), D, generator=g)
    mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 99)) * garbage
    return torch.where(mask[..., None], x, noise), mask


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in VARIANTS])
def test_model_contract(name, kw):
    torch.manual_seed(0)
    model = M.create_model(name, D, C, **kw)
    model.norm.fit(torch.randn(50, D) * 3 + 1)
    x, mask = batch()
    out = model(x, mask)
    assert out.shape == (len(LENGTHS), C) and torch.isfinite(out).all()
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient for {pname}"
        if pname.endswith("pool.score.bias"):  # one bias added to every step's score: softmax cancels it, so its
            continue                          # gradient is zero in exact arithmetic (rounding alone makes it non-zero)
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    model.eval()
    with torch.no_grad():
        ref = model(*batch(garbage=0.0))
        # padding content never matters
        assert torch.allclose(model(*batch(garbage=100.0)), ref, atol=1e-5)
        # nor does the amount of padding: each sequence alone, unpadded, gives the same logits
        x, mask = batch()
        for i, n in enumerate(LENGTHS):
            alone = model(x[i:i + 1, :n], mask[i:i + 1, :n])
            assert torch.allclose(alone, ref[i:i + 1], atol=1e-5), f"{name}: sequence {i} differs when unpadded"
    assert M.n_params(model) == sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", list(M.MODELS))
def test_rebuilt_from_config_alone(name, tmp_path):
    """create_model(**config) + state_dict reproduces the model, standardisation buffers included."""
    model = M.create_model(name, D, C, hidden=16)
    model.norm.fit(torch.randn(40, D) * 2 + 5)
    torch.save({"model_config": model.config, "model": model.state_dict()}, tmp_path / "m.pt")
    ck = torch.load(tmp_path / "m.pt", weights_only=True)
    cfg = dict(ck["model_config"])
    again = M.create_model(cfg.pop("name"), cfg.pop("input_dim"), cfg.pop("n_classes"), **cfg)
    again.load_state_dict(ck["model"])
    model.eval(), again.eval()
    x, mask = batch()
    assert torch.equal(model(x, mask), again(x, mask))
    assert torch.equal(again.norm.mean, model.norm.mean) and not torch.all(again.norm.mean == 0)


def test_model_on_top_of_a_trunk():
    """(B*T, D) embeddings from a CNN trunk reshape to (B, T, D); gradients reach the trunk."""
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, D))
    model = M.create_model("gru", D, C, hidden=8)
    frames = torch.randn(2 * 5, 3, 16, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    model(trunk(frames).view(2, 5, D), mask).sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError) as e:
        M.create_model("lstmm", D, C)
    for name in M.MODELS:
        assert name in str(e.value)


def test_order_blind_flags_and_registries_agree():
    """The registries implement the catalog's names (sequence/catalog.py), in its order, with its facts."""
    assert tuple(M.MODELS) == tuple(catalog.MODELS)
    assert tuple(splits.SPLITS) == tuple(catalog.SPLITS)
    assert all(M.MODELS[n].options == s.options and M.MODELS[n].order_aware == s.order_aware
               for n, s in catalog.MODELS.items())
    assert all((e.uses, e.cv, e.by_group, e.predefined) == (s.uses, s.cv, s.by_group, s.predefined)
               for e, s in zip(splits.SPLITS.values(), catalog.SPLITS.values()))
    assert {n for n, e in M.MODELS.items() if not e.order_aware} == {"mlp", "frame"}


@pytest.mark.parametrize("name", list(catalog.MODELS))
def test_unset_model_options_take_the_catalog_defaults(name, monkeypatch, tmp_path):
    """A model option left unset, in Python or on the command line, takes the model's catalog default: the config,
    its model_kwargs, the model built and finetune without --from agree (issue 25: conv1d had 1 layer through
    TrainConfig, 2 through create_model)."""
    want = catalog.MODELS[name].options
    tc = config.TrainConfig(cache="c.h5", out="o", model=name)
    assert tc.model_kwargs() == want
    assert {k: getattr(tc, k) for k in want} == want
    assert all(getattr(tc, k) is None for k in catalog.MODEL_OPTIONS if k not in want)  # options it does not use
    assert {k: v for k, v in M.create_model(name, D, C).config.items() if k in want} == want
    ft = config.FinetuneConfig(cache="c.h5", out="o", model=name).inherit(None, None)
    assert ft.model_kwargs() == want and {k: getattr(ft, k) for k in want} == want
    from click.testing import CliRunner

    from featseq.cli import main
    from featseq.sequence import train as T

    seen = {}

    def fake_train(cfg, log=None):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(T, "train", fake_train)
    r = CliRunner().invoke(main, ["train", __file__, "--out", str(tmp_path / "o"), "--model", name])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].model_kwargs() == want


def test_bad_model_options():
    with pytest.raises(ValueError, match="--pooling"):
        M.create_model("lstm", D, C, pooling="median")
    with pytest.raises(ValueError, match="--heads"):
        M.create_model("transformer", D, C, hidden=10, heads=4)
    with pytest.raises(ValueError, match="--layers"):
        M.create_model("gru", D, C, layers=0)
