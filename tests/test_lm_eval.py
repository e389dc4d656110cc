"""lm-evaluation-harness against ``kiln serve``, as a new user runs it: its
``local-completions`` model (tokenized requests, the bundled model's Hugging Face
tokenizer) on two local-data tasks under ``lm_eval_tasks/``, a multiple-choice one scored
by log-likelihood (``echo`` with prompt log-probabilities) and a ``generate_until`` one.
Every log-likelihood it gets back equals transformers' own on the same tokens, and every
generation equals kiln's greedy output. Nothing is downloaded."""

from pathlib import Path

import pytest
import torch
from hf_models import BUNDLED
from live_server import API_KEY, live_server
from transformers import AutoModelForCausalLM

from kiln import LLM, RuntimeConfig, SamplingParams

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extras: pip install -e '.[test]'")
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def evaluation(bundled_engine, tmp_path_factory):
    """The ``local-completions`` model that ran, and lm-eval's results with their samples."""
    with live_server(bundled_engine) as live, pytest.MonkeyPatch.context() as patch:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            patch.setenv(name, "1")
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        patch.chdir(TASKS)  # the tasks' data files are relative to it
        lm = LocalCompletionsAPI(model="tiny", base_url=f"{live.url}/v1/completions", tokenizer_backend="huggingface",
                                 tokenizer=str(BUNDLED), max_length=256, max_retries=1,
                                 header={"Authorization": f"Bearer {API_KEY}"})
        results = lm_eval.simple_evaluate(model=lm, tasks=["kiln_tiny_choice", "kiln_tiny_generate"],
                                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                                          log_samples=True, bootstrap_iters=0)
    return lm, results


def _transformers_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The log-likelihood of ``continuation`` after ``context``, and whether it is greedy."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].float(), -1)[len(context) - 1:]
    target = torch.tensor(continuation)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihoods_equal_transformers(evaluation):
    lm, results = evaluation
    model = AutoModelForCausalLM.from_pretrained(str(BUNDLED), dtype=torch.float32).eval()
    samples = results["samples"]["kiln_tiny_choice"]
    scored = [(pair, response) for sample in samples
              for pair, response in zip(sample["arguments"], sample["filtered_resps"], strict=True)]
    assert len(samples) == 5 and len(scored) == 15
    for (context, continuation), (loglikelihood, greedy) in scored:
        want, want_greedy = _transformers_loglikelihood(model, *lm._encode_pair(context, continuation))
        assert loglikelihood == pytest.approx(want, abs=1e-4) and loglikelihood < 0
        assert greedy == want_greedy
    assert 0 <= results["results"]["kiln_tiny_choice"]["acc,none"] <= 1


def test_generations_equal_kilns_greedy_tokens(evaluation, bundled_engine):
    lm, results = evaluation
    samples = results["samples"]["kiln_tiny_generate"]
    contexts = [sample["arguments"][0][0] for sample in samples]
    params = SamplingParams(max_tokens=16, temperature=0, stop=["\n\n"])
    want = LLM(bundled_engine, RuntimeConfig(num_blocks=64)).generate([lm.tok_encode(c) for c in contexts], params)
    assert [sample["filtered_resps"][0] for sample in samples] == [out.text for out in want]
    assert all(out.token_ids for out in want)
