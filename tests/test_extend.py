"""extend-context: same logits on the old positions (copy), longer forwards, resumable optimizer state."""

from pathlib import Path

import numpy as np
import pytest
import torch

from glassgpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from glassgpt.errors import UserError, run_main
from glassgpt.extend import extend_checkpoint, extend_rows, main


def trained_checkpoint(out_dir: Path, data_dir: Path, steps: int = 3) -> Path:
    """A tiny char checkpoint (block 32) with a real AdamW state, as the train loop saves it."""
    from tests.conftest import make_checkpoint

    path = make_checkpoint(out_dir, data_dir, block_size=32)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    data = torch.from_numpy(np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64))
    for _ in range(steps):
        x = torch.stack([data[i:i + 32] for i in (0, 50, 100)])
        y = torch.stack([data[i + 1:i + 33] for i in (0, 50, 100)])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ckpt.update(model=model.state_dict(), optimizer=opt.state_dict(), iter_num=steps,
                config={**ckpt["config"], "block_size": 32})
    return save_checkpoint(path, ckpt)


@pytest.fixture
def trained(tmp_path, char_dataset) -> Path:
    trained_checkpoint(tmp_path / "out", char_dataset)
    return tmp_path / "out"


def test_copy_keeps_logits_on_old_positions_and_forwards_longer(trained, tmp_path):
    dst = main([f"--out_dir={trained}", "--block_size=64", f"--new_out_dir={tmp_path / 'ext'}"])
    old = model_from_checkpoint(load_checkpoint(trained)).eval()
    new_ckpt = load_checkpoint(dst)
    new = model_from_checkpoint(new_ckpt).eval()
    assert new.config.block_size == 64 and new_ckpt["config"]["block_size"] == 64
    x = torch.randint(0, old.config.vocab_size, (2, 64))
    head = x[:, :32].contiguous()
    with torch.no_grad():
        ref, _ = old(head, head)
        got, _ = new(head, head)
        longer, _ = new(x, x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert longer.shape == (2, 64, old.config.vocab_size) and torch.isfinite(longer).all()
    # the source is untouched
    assert load_checkpoint(trained)["model_args"]["block_size"] == 32


def test_interpolate_matches_numpy_reference_and_keeps_ends():
    torch.manual_seed(0)
    table = torch.randn(32, 8)
    new = extend_rows(table, 64, "interpolate")
    xs = np.arange(64) * 31 / 63
    ref = np.stack([np.interp(xs, np.arange(32), table[:, c].numpy()) for c in range(8)], axis=1)
    np.testing.assert_allclose(new.numpy(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new[0], table[0])
    torch.testing.assert_close(new[-1], table[-1])
    tiled = extend_rows(table, 80, "copy")
    torch.testing.assert_close(tiled[32:64], table)
    torch.testing.assert_close(tiled[64:], table[:16])


def test_interpolate_changes_the_first_positions(trained, tmp_path):
    dst = main([f"--out_dir={trained}", "--block_size=64", "--method=interpolate", f"--new_out_dir={tmp_path / 'i'}"])
    old = model_from_checkpoint(load_checkpoint(trained)).eval()
    new = model_from_checkpoint(load_checkpoint(dst)).eval()
    x = torch.randint(0, old.config.vocab_size, (1, 32))
    with torch.no_grad():
        diff = (old(x, x)[0] - new(x, x)[0]).abs().max().item()
    assert diff > 1e-4, f"interpolation should move positions 1..30, logits moved by only {diff}"


@pytest.mark.parametrize("method", ["copy", "interpolate"])
@pytest.mark.parametrize("mode", ["adapt", "reset"])
def test_optimizer_state_loads_and_training_steps_run(trained, tmp_path, char_dataset, method, mode):
    dst = main([f"--out_dir={trained}", "--block_size=64", f"--method={method}", f"--optimizer={mode}",
                f"--new_out_dir={tmp_path / 'e'}"])
    ckpt = load_checkpoint(dst, with_optimizer=True)
    model = model_from_checkpoint(ckpt)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    opt.load_state_dict(ckpt["optimizer"])  # what init_from=resume does
    wpe_state = opt.state.get(model.transformer.wpe.weight, {})
    if mode == "adapt":
        assert wpe_state["exp_avg_sq"].shape == (64, 32) and (wpe_state["exp_avg_sq"] >= 0).all()
        old = load_checkpoint(trained, with_optimizer=True)["optimizer"]["state"][1]
        keep = 32 if method == "copy" else 1
        torch.testing.assert_close(wpe_state["exp_avg"][:keep], old["exp_avg"][:keep])
        assert wpe_state["exp_avg"][keep:].abs().max().item() == 0
    else:
        assert not opt.state
    data = torch.from_numpy(np.fromfile(char_dataset / "train.bin", dtype=np.uint16).astype(np.int64))
    x, y = data[:64].unsqueeze(0), data[1:65].unsqueeze(0)
    before = model.transformer.wpe.weight.detach().clone()
    losses = []
    for _ in range(3):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(np.isfinite(losses)), losses
    assert (model.transformer.wpe.weight[32:] - before[32:]).abs().max().item() > 0, "new rows must train"


def test_extend_checkpoint_does_not_touch_its_input(trained):
    ckpt = load_checkpoint(trained)
    wpe = ckpt["model"]["transformer.wpe.weight"].clone()
    new = extend_checkpoint(ckpt, 64)
    assert ckpt["model"]["transformer.wpe.weight"].shape == (32, 32)
    torch.testing.assert_close(ckpt["model"]["transformer.wpe.weight"], wpe)
    assert new["extended_from"] == {"block_size": 32, "method": "copy", "optimizer": "adapt", "iter_num": 3}


def test_bad_input_is_one_line_and_nonzero(trained, tmp_path, capsys):
    for argv, needle in (
        ([f"--out_dir={trained}", "--block_size=16"], "crop_block_size"),
        ([f"--out_dir={trained}", "--block_size=32"], "already has block_size=32"),
        ([f"--out_dir={trained}", "--block_size=64", "--method=spline"], "copy, interpolate"),
        ([f"--out_dir={trained}"], "--block_size=512"),
        ([f"--out_dir={trained}", "--block_size=64", f"--new_out_dir={trained}"], "is the source checkpoint"),
    ):
        assert run_main(main, argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
    with pytest.raises(UserError, match="overwrite"):
        main([f"--out_dir={trained}", "--block_size=64", f"--new_out_dir={tmp_path / 'x'}"])
        main([f"--out_dir={trained}", "--block_size=64", f"--new_out_dir={tmp_path / 'x'}"])


def test_training_resumes_through_glassgpt_train(tmp_path, char_dataset):
    """scratch (block 32) -> extend to 64 -> `train --init_from=resume --block_size=64` runs and saves."""
    from glassgpt.train import main as train_main

    common = [f"--data_dir={char_dataset}", "--dataset=tiny_char", "--n_layer=2", "--n_head=2", "--n_embd=32",
              "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=2", "--eval_interval=2",
              "--device=cpu", "--dtype=float32", "--compile=False", "--plot=False", "--log_interval=1",
              "--warmup_iters=0", "--lr_decay_iters=10", "--always_save_checkpoint=True"]
    src, ext = tmp_path / "src", tmp_path / "ext"
    train_main([f"--out_dir={src}", "--block_size=32", "--max_iters=2", *common])
    main([f"--out_dir={src}", "--block_size=64", f"--new_out_dir={ext}"])
    out = train_main([f"--out_dir={ext}", "--init_from=resume", "--block_size=64", "--max_iters=4", *common])
    assert out["iter_num"] == 4 and np.isfinite(out["last_eval"]["val"]), out
    ckpt = load_checkpoint(ext)
    assert ckpt["iter_num"] == 4 and ckpt["model_args"]["block_size"] == 64
    assert ckpt["model"]["transformer.wpe.weight"].shape == (64, 32)
    # resuming without the longer block_size is refused by train with a pointer here
    with pytest.raises(UserError, match="extend-context"):
        train_main([f"--out_dir={src}", "--init_from=resume", "--block_size=64", "--max_iters=4", *common])


def rotary_checkpoint(out_dir: Path, data_dir: Path, positions: dict | None = None) -> Path:
    """A tiny rotary (or `positions`) char checkpoint (block 32, head size 16) with an optimizer state."""
    import json

    from glassgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    meta = json.loads((data_dir / "meta.json").read_text())
    cfg = GPTConfig(block_size=32, vocab_size=meta["vocab_size"], n_layer=2, n_head=2, n_embd=32, bias=False,
                    qk_norm=True, activation="relu2", **(positions or dict(rope=True)))
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # random but not near-uniform attention
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    model(x, x)[1].backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": cfg.to_dict(), "iter_num": 1,
            "best_val_loss": 1e9, "config": {"dataset": data_dir.name, "data_dir": str(data_dir)},
            "tokenizer": {k: meta[k] for k in ("tokenizer", "vocab_size", "stoi", "itos")}}
    return save_checkpoint(out_dir / "ckpt.pt", ckpt)


@pytest.mark.parametrize("method", ["copy", "interpolate", "base"])
def test_rotary_extension_changes_the_rotation_not_the_weights(tmp_path, char_dataset, method):
    from glassgpt.model import rotary_cos_sin

    rotary_checkpoint(tmp_path / "rot", char_dataset)
    dst = main([f"--out_dir={tmp_path / 'rot'}", "--block_size=96", f"--method={method}",
                f"--new_out_dir={tmp_path / method}"])
    src_ckpt, new_ckpt = load_checkpoint(tmp_path / "rot", with_optimizer=True), load_checkpoint(dst, with_optimizer=True)
    old, new = model_from_checkpoint(src_ckpt).eval(), model_from_checkpoint(new_ckpt).eval()
    assert new.config.block_size == 96 and new.config.rope
    for k, v in src_ckpt["model"].items():
        torch.testing.assert_close(new_ckpt["model"][k], v, rtol=0, atol=0)
    assert new_ckpt["optimizer"]["state"].keys() == src_ckpt["optimizer"]["state"].keys()
    hs, factor = 16, 3.0
    slowest = lambda cfg, p: p / cfg.rope_scale * cfg.rope_base ** (-(hs - 2) / hs)  # angle of the slowest pair
    x = torch.randint(0, old.config.vocab_size, (1, 96))
    with torch.no_grad():
        diff = (old(x[:, :32], x[:, :32])[0] - new(x[:, :32], x[:, :32])[0]).abs().max().item()
        assert torch.isfinite(new(x, x)[0]).all()
    print(f"{method}: max |logit diff| on the old 32 positions {diff:.2e}")
    if method == "copy":  # nothing moved: the old positions score exactly as before
        assert diff == 0.0 and new.config.rope_scale == 1.0 and new.config.rope_base == 10000.0
    elif method == "interpolate":  # position 3p of the new model turns exactly like position p of the old
        assert new.config.rope_scale == factor and diff > 1e-4
        pos = torch.arange(32)[None]
        for a, b in zip(rotary_cos_sin(pos * 3, hs, new.config.rope_base, new.config.rope_scale),
                        rotary_cos_sin(pos, hs, old.config.rope_base, old.config.rope_scale)):
            torch.testing.assert_close(a, b)
    else:  # the slowest pair at the new last position turns as far as at the old one; the fastest is kept
        assert new.config.rope_scale == 1.0 and diff > 1e-4
        assert slowest(new.config, 96) == pytest.approx(slowest(old.config, 32))


def test_alibi_extension_changes_only_block_size(tmp_path, char_dataset):
    rotary_checkpoint(tmp_path / "alibi", char_dataset, dict(alibi=True, ngram=3, ngram_rows=97))
    for method in ("interpolate", "base"):  # nothing to interpolate or rescale: refused, not ignored
        with pytest.raises(UserError, match="ALiBi"):
            main([f"--out_dir={tmp_path / 'alibi'}", "--block_size=96", f"--method={method}"])
    dst = main([f"--out_dir={tmp_path / 'alibi'}", "--block_size=96", f"--new_out_dir={tmp_path / 'ext'}"])
    src_ckpt = load_checkpoint(tmp_path / "alibi", with_optimizer=True)
    new_ckpt = load_checkpoint(dst, with_optimizer=True)
    old, new = model_from_checkpoint(src_ckpt).eval(), model_from_checkpoint(new_ckpt).eval()
    assert new.config.block_size == 96 and new.config.alibi
    assert new_ckpt["optimizer"]["state"].keys() == src_ckpt["optimizer"]["state"].keys()
    for k, v in src_ckpt["model"].items():
        torch.testing.assert_close(new_ckpt["model"][k], v, rtol=0, atol=0)
    x = torch.randint(0, old.config.vocab_size, (1, 96))
    with torch.no_grad():
        torch.testing.assert_close(new(x[:, :32], x[:, :32])[0], old(x[:, :32], x[:, :32])[0], rtol=0, atol=0)
        assert torch.isfinite(new(x, x)[0]).all()


def test_base_method_needs_a_rotary_model(trained, tmp_path):
    with pytest.raises(UserError, match="rotary"):
        main([f"--out_dir={trained}", "--block_size=64", "--method=base", f"--new_out_dir={tmp_path / 'b'}"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_of_glassgpt_optim_is_adapted_and_loads(tmp_path, char_dataset, optimizer):
    """A checkpoint whose optimizer glassgpt.optim built (named groups; Muon + AdamW for 'muon'):
    wpe's moments are found, grown, and the state loads into the extended model's optimizer."""
    from dataclasses import replace

    from glassgpt.config import TrainConfig
    from glassgpt.optim import build_optimizers
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "o", char_dataset, block_size=32)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    cfg = replace(TrainConfig(), optimizer=optimizer)
    opt = build_optimizers(model, cfg, "cpu")
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    model(x, x)[1].backward()
    opt.step()
    ckpt.update(model=model.state_dict(), optimizer=opt.state_dict())
    new = extend_checkpoint(ckpt, 64, "copy")
    grown = model_from_checkpoint(new)
    new_opt = build_optimizers(grown, cfg, "cpu")
    new_opt.load_state_dict(new["optimizer"])
    adam = new_opt.by_name["adamw"]
    wpe = grown.transformer.wpe.weight
    assert adam.state[wpe]["exp_avg_sq"].shape == (64, 32)
    old_sq = opt.by_name["adamw"].state[model.transformer.wpe.weight]["exp_avg_sq"]
    torch.testing.assert_close(adam.state[wpe]["exp_avg_sq"][:32], old_sq)
    for g in new_opt.param_groups:  # every moment fits its parameter
        for p in g["params"]:
            st = new_opt.by_name["muon" if g["name"] == "hidden" else "adamw"].state.get(p, {})
            for v in st.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    assert v.shape == p.shape, (g["name"], v.shape, p.shape)
    grown(torch.randint(0, grown.config.vocab_size, (2, 64)), torch.randint(0, grown.config.vocab_size, (2, 64)))[1].backward()
    new_opt.step()  # and it steps
