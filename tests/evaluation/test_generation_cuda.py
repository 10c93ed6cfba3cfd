"""Greedy decoding on a CUDA GPU: a step replayed from its captured graph decodes as the model does
uncached (skipped without a GPU)."""

import random

import pytest
import torch

from linearard.evaluation.generation import greedy_generate
from tiny import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def uncached(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq], device="cuda")).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_graph_replayed_decoding_equals_uncached(family, monkeypatch):
    model = tiny_model(family).cuda()
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(1), real_replay(graph)))
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 17, 40, 41)]
    outputs = greedy_generate(model, prompts, max_new_tokens=10, batch_size=4)
    for prompt, out in zip(prompts, outputs):
        assert out == uncached(model, prompt, 10)
    # a model with sliding-window layers decodes eagerly: its cache picks the update by a Python count
    assert bool(replays) == (family != "gemma2")
