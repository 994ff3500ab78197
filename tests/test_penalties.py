"""The repetition, frequency and presence penalties: the arithmetic on a fixed vector, which tokens count, the same
through generate, generate_batch and sample.py, and a greedy loop they break."""

import pytest
import torch

import sample
from model import ModelConfig, Penalties, Transformer, apply_penalties

LOGITS = [2.0, -2.0, 1.0, -1.0, 0.5, 3.0]


def test_the_arithmetic_on_a_fixed_vector():
    """Prompt [0, 1], then generated 4, 1, 4: the repetition penalty (2) acts on 0, 1 and 4; frequency (0.5) and
    presence (0.25) on the generated 1 (once) and 4 (twice) only."""
    penalties = Penalties([[0, 1]], len(LOGITS), "cpu", repetition=2.0, frequency=0.5, presence=0.25)
    for token in (4, 1, 4):
        penalties.add(torch.tensor([token]))
    expected = [2.0 / 2,                     # in the prompt, positive: divided
                -2.0 * 2 - 0.5 * 1 - 0.25,   # in the prompt and generated once, negative: multiplied
                1.0, -1.0,                   # never seen
                0.5 / 2 - 0.5 * 2 - 0.25,    # generated twice
                3.0]
    assert penalties(torch.tensor([LOGITS])).tolist() == [expected]
    # OpenAI's formula as written: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    counts = torch.tensor([[0, 1, 0, 0, 2, 0]], dtype=torch.float)
    negative = apply_penalties(torch.tensor([LOGITS]), counts > 0, counts, frequency_penalty=-1.0, presence_penalty=2.0)
    assert negative.tolist() == [[2.0, -2.0 + 1 - 2, 1.0, -1.0, 0.5 + 2 - 2, 3.0]]
    off = Penalties([[0, 1]], len(LOGITS), "cpu")
    assert off(torch.tensor([LOGITS])).tolist() == [LOGITS]


def test_the_repetition_penalty_is_transformers():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    prompts, generated = [[1, 2, 3], [7, 7, 8], [40, 41, 1]], [[5, 5, 2], [7, 9, 11], [0, 1, 49]]
    penalties = Penalties(prompts, 50, "cpu", repetition=1.7)
    for step in zip(*generated):
        penalties.add(torch.tensor(step))
    reference = transformers.RepetitionPenaltyLogitsProcessor(1.7)(
        torch.tensor([p + g for p, g in zip(prompts, generated)]), logits.clone())
    assert torch.equal(penalties(logits), reference)


def penalised_greedy(model, prompt, steps, rep, freq, pres):
    """Greedy tokens from full forward passes, the penalties computed from Python lists, without Penalties."""
    out = []
    for _ in range(steps):
        logits = model(torch.tensor([prompt + out]))[0, -1].tolist()
        for j in set(prompt + out):
            logits[j] = logits[j] * rep if logits[j] < 0 else logits[j] / rep
        for j in set(out):
            logits[j] -= freq * out.count(j) + pres
        out.append(max(range(len(logits)), key=logits.__getitem__))
    return out


def test_generate_and_generate_batch_penalise_as_the_formula():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).eval()
    for p in model.parameters():
        p.data += 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    prompts = [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 3)]
    settings = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3)
    expected = [penalised_greedy(model, p, 20, 1.3, 0.4, 0.3) for p in prompts]
    assert expected != [list(model.generate(p, 20, temperature=0)) for p in prompts]  # the penalties changed a choice
    assert [list(model.generate(p, 20, temperature=0, **settings)) for p in prompts] == expected
    assert model.generate_batch(prompts, 20, temperature=0, **settings) == expected


def test_a_greedy_loop_is_broken():
    """A model with tied embeddings fresh from its init predicts the token it was given (the logits are the final
    hidden state, mostly that token's embedding, against every embedding): at temperature 0 it repeats the prompt's
    last token forever. A frequency penalty, growing with each repeat, ends every loop at its second token; a
    presence penalty is paid once, so it must outweigh the loop's pull (2 here; 1 leaves runs of 10 and more)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                    tie_embeddings=True)).eval()
    assert list(model.generate([1, 2, 3], 60, temperature=0)) == [3] * 60
    tokens = list(model.generate([1, 2, 3], 60, temperature=0, frequency_penalty=1.0))
    assert max(tokens.count(t) for t in tokens) == 2
    assert len(set(model.generate([1, 2, 3], 60, temperature=0, presence_penalty=2.0))) == 60


@pytest.mark.parametrize("argv", [["--out_dir=a", "--frequency_penalty=2.5"], ["--out_dir=a", "--presence_penalty=-3"],
                                  ["--out_dir=a", "--repetition_penalty=0"]])
def test_sample_py_refuses_penalties_out_of_range(argv):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
