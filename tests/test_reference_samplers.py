"""At temperature 0 dlmprobe's diffusion sampler equals LLaDA's and Dream's algorithms token for token.

The oracles below are written from the papers' algorithms, independently of dlmprobe's loop: they
take the raw model (the remote-code module transformers loads, or the built-in TransformerLens
model), softmax the whole vocabulary and pick positions with ``topk``. Their one deviation from the
originals is dlmprobe's: the mask token is never chosen (probability set to 0 after the softmax).
"""

import pytest
import torch
from hf_fixtures import save_dream, save_llada
from transformers import AutoModel, AutoModelForCausalLM

from dlmprobe.models import random_model
from dlmprobe.models.handle import from_checkpoint
from dlmprobe.models.huggingface import load_hf_model
from dlmprobe.sampling import DiffusionSamplerConfig, make_canvas, sample


def _probs(logits, mask_id):
    probs = torch.softmax(logits.float(), dim=-1)
    probs[..., mask_id] = 0  # never chosen; the normaliser keeps it, as the references do
    return probs


def _score(logits, probs, order):
    top2 = probs.topk(2, dim=-1).values
    if order == "confidence":
        return top2[..., 0]
    if order == "margin":
        return top2[..., 0] - top2[..., 1]
    full = torch.softmax(logits.float(), dim=-1)  # entropy over the whole softmax, mask included
    return (full * torch.log(full + 1e-10)).sum(-1)


def llada_oracle(logits_fn, prompt, gen_length, steps, block_length, mask_id):
    """LLaDA's semi-autoregressive low-confidence remasking (Nie et al. 2025, Algorithm 5)."""
    x = make_canvas(prompt, gen_length, mask_id)
    start = prompt.shape[1]
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = start + b * block_length, start + (b + 1) * block_length
        n_masked = (x[:, lo:hi] == mask_id).sum(-1)
        base, extra = n_masked // per_block, n_masked % per_block
        for i in range(per_block):
            probs = _probs(logits_fn(x), mask_id)
            conf, x0 = probs.max(-1)
            conf = torch.where(x == mask_id, conf, -torch.inf)
            conf[:, hi:] = -torch.inf
            for row in range(x.shape[0]):
                k = int(base[row] + (i < extra[row]))
                chosen = conf[row].topk(k).indices
                x[row, chosen] = x0[row, chosen]
    return x


def dream_oracle(raw_logits_fn, prompt, gen_length, steps, order, mask_id, eps=1e-3):
    """Dream's diffusion_generate at temperature 0: shifted logits, a float32 linspace schedule."""
    x = make_canvas(prompt, gen_length, mask_id)
    times = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        raw = raw_logits_fn(x)
        logits = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)  # hidden state i predicts token i + 1
        probs = _probs(logits, mask_id)
        x0 = probs.argmax(-1)
        masked = x == mask_id
        conf = torch.where(masked, _score(logits, probs, order), -torch.inf)
        for row in range(x.shape[0]):
            n = masked[row].sum().float()
            k = int(n * (1 - times[i + 1] / times[i])) if i < steps - 1 else int(n)
            if k:
                chosen = conf[row].topk(k).indices
                x[row, chosen] = x0[row, chosen]
    return x


def _sharpen(folder, auto_class, factor=30.0):
    """Scale the unembedding: a random tiny model's near-uniform outputs have entropies a few ulps
    apart, whose order no two implementations round alike; a trained model's are far apart."""
    model = auto_class.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"llada": save_llada(tmp_path_factory.mktemp("llada")),
            "dream": _sharpen(save_dream(tmp_path_factory.mktemp("dream")), AutoModel)}


def _prompt(handle, batch=3, length=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, handle.mask_id, (batch, length), generator=generator)


@pytest.mark.parametrize("steps,block_length", [(8, 8), (8, 4), (4, 4), (6, 8)])
def test_llada_fixture_equals_the_llada_oracle(folders, steps, block_length):
    if 8 % block_length or steps % (8 // block_length):
        pytest.skip("not a LLaDA schedule")
    handle = load_hf_model(folders["llada"], trust_remote_code=True)
    reference = AutoModelForCausalLM.from_pretrained(folders["llada"], trust_remote_code=True).eval()
    prompt = _prompt(handle)
    with torch.no_grad():
        expected = llada_oracle(lambda x: reference(input_ids=x).logits, prompt, 8, steps, block_length, handle.mask_id)
    config = DiffusionSamplerConfig(steps=steps, block_length=block_length)
    got = sample(handle, make_canvas(prompt, 8, handle.mask_id), prompt.shape[1], 8, handle.mask_id, config)
    assert torch.equal(got.canvases[:, -1], expected)


@pytest.mark.parametrize("steps,block_length", [(3, 3), (3, 1), (2, 3)])
def test_builtin_denoiser_equals_the_llada_oracle(tiny_config, steps, block_length):
    ckpt = random_model(tiny_config)
    handle, mask_id = from_checkpoint(ckpt), ckpt.task.vocab.mask_id
    prompt = torch.tensor([[ckpt.task.vocab.bos_id, *ex.prompt, ckpt.task.vocab.sep_id] for ex in ckpt.task.sample(6, "eval")])
    with torch.no_grad():
        expected = llada_oracle(ckpt.model, prompt, 3, steps, block_length, mask_id)
    config = DiffusionSamplerConfig(steps=steps, block_length=block_length)
    for model in (handle, ckpt.model):  # a handle, or the bare built-in model: one path
        got = sample(model, make_canvas(prompt, 3, mask_id), prompt.shape[1], 3, mask_id, config)
        assert torch.equal(got.canvases[:, -1], expected)


@pytest.mark.parametrize("order", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [8, 5, 12])
def test_dream_fixture_equals_the_dream_oracle(folders, order, steps):
    handle = load_hf_model(folders["dream"], trust_remote_code=True)
    reference = AutoModel.from_pretrained(folders["dream"], trust_remote_code=True).eval()
    prompt = _prompt(handle)
    internal = DiffusionSamplerConfig(order=order).order
    with torch.no_grad():
        expected = dream_oracle(lambda x: reference(input_ids=x).logits, prompt, 8, steps, internal, handle.mask_id)
    config = DiffusionSamplerConfig(steps=steps, order=order, schedule="dream")
    got = sample(handle, make_canvas(prompt, 8, handle.mask_id), prompt.shape[1], 8, handle.mask_id, config)
    assert torch.equal(got.canvases[:, -1], expected)
    assert (got.canvases[:, -1, prompt.shape[1]:] != handle.mask_id).all()


def test_dream_order_names_map_to_dlmprobe_orders():
    names = {"maskgit_plus": "confidence", "topk_margin": "margin", "entropy": "entropy", "origin": "random"}
    for dream, ours in names.items():
        assert DiffusionSamplerConfig(order=dream).order == ours
    with pytest.raises(ValueError, match="maskgit_plus"):
        DiffusionSamplerConfig(order="low_confidence")


def test_dream_origin_commits_every_position_by_the_last_step(folders):
    handle = load_hf_model(folders["dream"], trust_remote_code=True)
    prompt = _prompt(handle)
    config = DiffusionSamplerConfig(steps=4, order="origin", schedule="dream", seed=3)
    got = sample(handle, make_canvas(prompt, 8, handle.mask_id), prompt.shape[1], 8, handle.mask_id, config)
    assert (got.canvases[:, -1, prompt.shape[1]:] != handle.mask_id).all()
    assert (got.target_commit_step >= 0).all()
