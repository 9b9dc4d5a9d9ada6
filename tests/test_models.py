import json

import pytest
import torch

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import ModelConfig, build_native, load_model, random_model, save_checkpoint, store_half


def test_twins_share_architecture_and_parameter_count(tiny_config):
    diffusion, autoregressive = random_model(tiny_config), random_model(tiny_config.twin())
    assert diffusion.config.attention_dir == "bidirectional"
    assert autoregressive.config.attention_dir == "causal"
    assert diffusion.n_params == autoregressive.n_params
    assert ModelConfig.from_dict(tiny_config.to_dict()) == tiny_config


def _later_token_changes_earlier_logits(checkpoint) -> bool:
    task = checkpoint.task
    seq = torch.tensor([task.sample(1, "eval")[0].sequence(task.vocab)])
    edited = seq.clone()
    edited[0, -2] = (edited[0, -2] + 1) % len(task.vocab)
    with torch.no_grad():
        a, b = checkpoint.model(seq), checkpoint.model(edited)
    return not torch.allclose(a[0, :-2], b[0, :-2])


def test_diffusion_attends_forward_and_the_twin_does_not(tiny_config):
    assert _later_token_changes_earlier_logits(random_model(tiny_config))
    assert not _later_token_changes_earlier_logits(random_model(tiny_config.twin()))


def test_models_speak_transformer_lens_hook_names(tiny_config):
    model = random_model(tiny_config).model
    tokens = torch.tensor([tiny_config.build_task().sample(1, "eval")[0].sequence(tiny_config.build_task().vocab)])
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert sorted(cache.keys()) == [f"blocks.{i}.hook_resid_post" for i in range(tiny_config.n_layers)]
    assert cache["blocks.0.hook_resid_post"].shape == (1, tokens.shape[1], tiny_config.d_model)


def test_checkpoint_round_trip_is_safetensors_and_json(tiny_config, tmp_path):
    native = build_native(tiny_config)
    save_checkpoint(native, tiny_config, tmp_path / "ckpt", info={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    tokens = torch.randint(5, len(loaded.task.vocab), (2, tiny_config.n_ctx))
    with torch.no_grad():
        assert torch.allclose(native(tokens), loaded.model(tokens), atol=1e-5)
    assert loaded.info == {"note": "test"}
    assert len(loaded.weights_sha256) == 64


def test_float16_storage_halves_the_file_and_loads_the_rounded_weights(tiny_config, tmp_path):
    module = build_native(tiny_config)
    save_checkpoint(module, tiny_config, tmp_path / "m")
    trained = load_model(tmp_path / "m")
    trained_sha256 = trained.weights_sha256
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    store_half(tmp_path / "m")
    half = load_model(tmp_path / "m")  # verified against the new sha256 recorded in config.json
    assert (tmp_path / "m" / "model.safetensors").stat().st_size < 0.55 * size
    assert half.info["stored_dtype"] == "float16" and half.info["trained_weights_sha256"] == trained_sha256
    for (name, a), (_, b) in zip(trained.model.named_parameters(), half.model.named_parameters(), strict=True):
        assert b.dtype == torch.float32 and torch.equal(b, a.half().float()), name
    with pytest.raises(DlmprobeInputError, match="already stored as float16"):
        store_half(tmp_path / "m")


def test_bad_checkpoints_are_clear_errors(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_model(tmp_path / "missing")
    save_checkpoint(build_native(tiny_config), tiny_config, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="do not match the sha256 recorded"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="expected a safetensors file"):
        load_model(tmp_path / "ckpt", verify=False)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model": {"task": "arith", "colour": 1}}))
    with pytest.raises(ValueError, match="unknown model config fields"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("field,value,message", [("kind", "gan", "kind must be"), ("n_heads", 3, "divisible")])
def test_bad_model_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(task="arith", **{field: value})


def test_rotary_positions_build_round_trip_and_match_the_bridge(tiny_config, tmp_path):
    from dataclasses import replace

    from dlmprobe.models import build_native, load_model, save_checkpoint, to_bridge

    config = replace(tiny_config, positions="rotary")
    native = build_native(config)
    assert not any("pos" in name for name, _ in native.named_parameters())  # no absolute position table
    tokens = torch.randint(0, config.d_vocab, (3, config.n_ctx))
    with torch.no_grad():
        raw = native(tokens)
        raw = raw if torch.is_tensor(raw) else raw[0]
        bridged = to_bridge(native, config)(tokens)
    torch.testing.assert_close(bridged, raw, atol=1e-4, rtol=0)
    assert config.twin().positions == "rotary"
    save_checkpoint(build_native(config), config, tmp_path / "rot")  # to_bridge wrapped `native` in place
    loaded = load_model(tmp_path / "rot")
    assert loaded.config.positions == "rotary"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), bridged, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positions must be one of"):
        replace(tiny_config, positions="alibi")
