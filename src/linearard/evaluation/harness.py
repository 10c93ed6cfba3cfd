"""Run lm-evaluation-harness tasks in-process on an in-memory model (optional extra ``lm_eval``).

:class:`HarnessModel` implements the harness's language-model interface (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) on top of this package's batched scoring and KV-cached
greedy decoding; it needs nothing from the harness itself. :func:`lm_eval_model` makes it an
instance of the harness's ``LM`` base class, and :func:`run_lm_eval_task` runs one task the way
``linearard eval --tasks lm_eval:<task>`` does. The harness downloads task data on first use, so those
two need network access.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from linearard.errors import UserError
from linearard.evaluation.generation import greedy_generate
from linearard.evaluation.scoring import (
    Request,
    bos_prefix,
    encode,
    encode_pairs,
    loglikelihoods,
    prefix_token,
    supported_length,
)
from linearard.evaluation.stats import na_cell, task_result

LM_EVAL_INSTALL = "pip install 'lm_eval>=0.4' (or: pip install 'linearard[lm-eval]')"


class HarnessModel:
    """The harness's LM interface over a causal LM and its tokenizer.

    Requests are objects with an ``args`` tuple, as the harness's ``Instance``: ``(context,
    continuation)`` for :meth:`loglikelihood`, ``(text,)`` for :meth:`loglikelihood_rolling`,
    ``(context, gen_kwargs)`` for :meth:`generate_until`.

    Args:
        model, tokenizer: the model to evaluate.
        batch_size: sequences per forward pass.
        max_length: the longest input (default: the model's supported length).

    Example:
        >>> hm = HarnessModel(model, tokenizer)
        >>> [(logprob, greedy)] = hm.loglikelihood([SimpleNamespace(args=("2 + 2 =", " 4"))])
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or supported_length(model)

    def loglikelihood(self, requests: Sequence) -> list[tuple[float, bool]]:
        """Log-probability of each continuation given its context, and whether it is the greedy one."""
        pairs = encode_pairs(self.tokenizer, [req.args for req in requests])
        scores = loglikelihoods(self.model, [Request(c, t) for c, t in pairs],
                                batch_size=self.batch_size, max_length=self.max_length)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence) -> list[float]:
        """Log-probability of each whole text, conditioned on the BOS/EOS token only.

        Texts longer than the model's length are scored in disjoint chunks, each predicted with as
        much preceding text as fits (every token is predicted exactly once).
        """
        start = prefix_token(self.tokenizer)
        chunks, owners = [], []
        for k, req in enumerate(requests):
            ids = encode(self.tokenizer, req.args[0])
            full = [start, *ids]
            for lo in range(0, len(ids), self.max_length):
                hi = min(len(ids), lo + self.max_length)
                # context = everything before the chunk; scoring keeps the last max_length inputs
                chunks.append(Request(full[:lo + 1], ids[lo:hi]))
                owners.append(k)
        scores = loglikelihoods(self.model, chunks, groups=list(range(len(chunks))),
                                batch_size=self.batch_size, max_length=self.max_length)
        totals = [0.0] * len(requests)
        for k, s in zip(owners, scores):
            totals[k] += s.logprob
        return totals

    def generate_until(self, requests: Sequence) -> list[str]:
        """Greedy continuation of each context, cut at the first of its ``until`` strings.

        Requests with the same stop strings and token budget are decoded in one batch.
        """
        batches: dict[tuple, list[int]] = {}
        for k, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            if kwargs.get("do_sample"):
                raise ValueError("HarnessModel decodes greedily only; the task asked for sampling")
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            batches.setdefault((until, int(kwargs.get("max_gen_toks", 256))), []).append(k)
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        results = [""] * len(requests)
        head = bos_prefix(self.tokenizer)
        for (until, max_new), members in batches.items():
            prompts = []
            for k in members:
                prompt = head + encode(self.tokenizer, requests[k].args[0])
                prompts.append(prompt[-max(1, self.max_length - max_new):])

            def reached_stop(tokens: list[int], until=until) -> bool:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                return any(u in text for u in until)

            outputs = greedy_generate(self.model, prompts, max_new_tokens=max_new, stop_ids=stops,
                                      stop_fn=reached_stop if until else None, batch_size=self.batch_size)
            for k, out in zip(members, outputs):
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                for u in until:
                    text = text.split(u)[0]
                results[k] = text
        return results


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    if not lm_eval_available():
        raise UserError(f"lm_eval:<task> needs lm-evaluation-harness: {LM_EVAL_INSTALL}")


def lm_eval_model(model, tokenizer, *, batch_size: int = 16, max_length: int | None = None):
    """A :class:`HarnessModel` that is also an ``lm_eval.api.model.LM`` (what the harness accepts)."""
    require_lm_eval()
    from lm_eval.api.model import LM

    cls = type("LinearardLM", (HarnessModel, LM), {})
    instance = cls.__new__(cls)
    LM.__init__(instance)
    HarnessModel.__init__(instance, model, tokenizer, batch_size=batch_size, max_length=max_length)
    return instance


def run_lm_eval_task(model, tokenizer, task: str, *, limit: int | None = None, seed: int = 0,
                     batch_size: int = 16, include_path: str | None = None) -> dict:
    """Run harness task `task` on the in-memory model; every metric with its stderr.

    Args:
        model, tokenizer: the model to evaluate.
        task: a harness task name (its own default few-shot setting applies).
        limit: at most this many documents (the harness takes the first ones).
        seed: the harness's random, numpy, torch and few-shot seeds.
        batch_size: sequences per forward pass.
        include_path: a folder of extra task YAMLs (e.g. a local custom task).

    Returns:
        A task result whose metrics are the harness's (``acc``, ``acc_norm``, ``word_perplexity``...),
        the first one reported as primary.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = lm_eval_model(model, tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else None
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    except (KeyError, ValueError) as err:
        raise UserError(f"lm_eval could not run task {task!r}: {err}") from err
    if out is None or task not in out.get("results", {}):
        raise UserError(f"lm_eval returned no results for task {task!r}")
    raw = out["results"][task]
    higher = out.get("higher_is_better", {}).get(task, {})
    metrics, lower = {}, []
    for key, value in raw.items():
        name, _, _filter = key.partition(",")
        if name.endswith("_stderr") or name == "alias" or not isinstance(value, (int, float)):
            continue
        stderr = raw.get(key.replace(name, f"{name}_stderr", 1))
        n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
        metrics[name] = {"value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n}
        if higher.get(name) is False:
            lower.append(name)
    if not metrics:
        metrics["score"] = na_cell("lm_eval reported no numeric metric")
    return task_result(metrics, primary=next(iter(metrics)), lower_is_better=lower,
                       details={"lm_eval_version": getattr(lm_eval, "__version__", "unknown")})
