"""What an evaluation run measures and how much of it: one dataclass, defaults per device.

On a GPU the defaults are the real thing (full validation sets, lengths up to 32K); on a CPU they are
small enough to finish in minutes for a 135M-parameter model. Every field can be overridden.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(frozen=True)
class EvalSettings:
    limit: int | None = field(default=None, metadata={
        "help": "items per benchmark, a fixed random subset (None: the full evaluation split)"})
    seed: int = field(default=0, metadata={
        "help": "seed of benchmark subsets and of the synthetic long-context prompts"})
    batch_size: int = field(default=64, metadata={"help": "sequences per forward pass on short tasks",
                                                  "speed_only": True})
    max_batch_tokens: int = field(default=32768, metadata={
        "help": "windows and long-context prompts are batched up to about this many tokens", "speed_only": True})
    ppl_lengths: tuple[int, ...] = field(default=(256, 1024, 4096), metadata={
        "help": "window lengths of the held-out perplexity (ppl)"})
    ppl_tokens: int | None = field(default=None, metadata={
        "help": "tokens of each held-out text used per ppl length (None: the whole text)"})
    agreement_length: int = field(default=1024, metadata={"help": "window length of the agreement task"})
    agreement_tokens: int | None = field(default=None, metadata={
        "help": "tokens of each held-out text used by the agreement task (None: the whole text)"})
    chat_tokens: int = field(default=64, metadata={"help": "most tokens of a chat answer"})
    lengths: tuple[int, ...] = field(default=(4096, 8192, 16384, 32768), metadata={
        "help": "lengths of the long-context tasks (passkey, RULER-style, longppl)"})
    depths: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75, 1.0), metadata={
        "help": "passkey depths (fraction of the filler before the key)"})
    samples: int = field(default=5, metadata={
        "help": "prompts per passkey cell (length x depth) and per RULER-style length"})
    longppl_target: int = field(default=256, metadata={
        "help": "tokens scored by longppl, after growing preceding context"})
    longppl_samples: int = field(default=4, metadata={"help": "target spans per long text in longppl"})
    lm_eval_include: str | None = field(default=None, metadata={
        "help": "a folder of extra lm-evaluation-harness task YAMLs for lm_eval:<task> (local tasks)"})

    @classmethod
    def for_device(cls, device_type: str, **overrides) -> EvalSettings:
        """Defaults for ``"cuda"`` (full) or anything else (small, CPU), with `overrides` applied.

        Example:
            >>> EvalSettings.for_device("cpu", limit=50).limit
            50
        """
        base = cls() if device_type == "cuda" else _CPU
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown evaluation settings: {sorted(unknown)}")
        return replace(base, **overrides)


_CPU = EvalSettings(
    limit=100,
    batch_size=16,
    max_batch_tokens=8192,
    ppl_lengths=(256, 1024),
    ppl_tokens=4096,
    agreement_length=512,
    agreement_tokens=2048,
    chat_tokens=32,
    lengths=(1024, 2048),
    depths=(0.0, 0.5, 1.0),
    samples=2,
    longppl_target=128,
    longppl_samples=2,
)


def measured(settings: EvalSettings | dict) -> dict:
    """The settings that decide the numbers, as a dict: every field but those that only set how fast
    they are computed (batch sizes). Accepts a dict as read back from a results file.

    Example:
        >>> "batch_size" in measured(EvalSettings())
        False
    """
    values = asdict(settings) if isinstance(settings, EvalSettings) else dict(settings)
    return {k: v for k, v in values.items() if k not in _SPEED_ONLY}


def device_defaults(name: str) -> str:
    """How setting `name` defaults on each kind of device, for help texts.

    Example:
        >>> device_defaults("batch_size")
        '16 on CPU, 64 on GPU'
    """

    def show(value: object) -> str:
        if value is None:
            return "all"
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    return f"{show(getattr(_CPU, name))} on CPU, {show(getattr(EvalSettings(), name))} on GPU"


_SPEED_ONLY = frozenset(f.name for f in fields(EvalSettings) if f.metadata.get("speed_only"))
